"""A comparison's numbers: each run's losses, metrics and steps to the targets, their mean ± std over seeds per method
and rate (runs that diverged counted apart, not averaged in), and each method's chosen rate."""

from __future__ import annotations

from ..training.metrics import HIGHER_IS_BETTER, better
from .curves import mean_std, steps_to_reach
from .search import edge
from .statistics import binomial_se, difference, diverged
from .sweeps import group_name

#: per-run values aggregated over seeds in the summary
STATS = (
    "first_loss",
    "final_loss",
    "eval_loss_start",
    "eval_loss",
    "steps_to_train_target",
    "steps_to_eval_target",
    "steps_to_metric_target",
    "train_seconds",
    "decompose_seconds",
    "selection",
)


def summarise(
    records: list[dict],
    curves: dict,
    smoothed: dict,
    target_loss: float | None,
    metric: str,
    target_metric: float | None,
) -> tuple[list[dict], dict, dict]:
    """Add each run's losses and metrics (from its metrics.jsonl, which a resumed run continues) and steps to reach
    the targets to its record; aggregate over seeds per method and rate; choose each method's rate. Search runs
    with fewer steps (`--search-steps`) are measured but neither aggregated nor chosen from.

    Returns:
        (summary: one record per method and rate, best_lr: {method: rate}, the targets).
    """
    for r in records:
        measure(r, curves[r["run"]], smoothed[r["run"]], metric)
    records = [r for r in records if r.get("search_steps") is None]
    by_rate: dict[tuple, list[dict]] = {}
    for r in records:
        by_rate.setdefault((group_name(r["method"], r["progressive"]), r["lr"]), []).append(r)
    best_lr = _choose_rates(by_rate, metric)
    best = [r for r in records if r["lr"] == best_lr[group_name(r["method"], r["progressive"])] and not r["diverged"]]
    goal, finals, evals = _targets(best, target_loss, metric, target_metric)
    higher = HIGHER_IS_BETTER[metric]
    for r in records:
        r["steps_to_train_target"] = steps_to_reach(smoothed[r["run"]], goal["train"]) if finals else None
        r["steps_to_eval_target"] = steps_to_reach(curves[r["run"]]["eval"], goal["eval"]) if evals else None
        r["steps_to_metric_target"] = (
            steps_to_reach(curves[r["run"]]["metrics"].get(metric, []), goal["metric"], higher=higher)
            if goal["metric"] is not None
            else None
        )
    summary = [_row(group, lr, runs, best_lr) for (group, lr), runs in by_rate.items()]
    return summary, best_lr, goal


def measure(r: dict, c: dict, smoothed: list, metric: str) -> None:
    """A run's first, final and best losses and metrics, whether it diverged, and the value that ranks it, into
    its record."""
    train, evals = c["train"], c["eval"]
    r["diverged"] = bool(r.get("failed")) or diverged([v for _, v in train], smoothed[-1][1] if smoothed else None)
    r["first_loss"] = train[0][1] if train else None
    r["final_loss"] = smoothed[-1][1] if train else None
    r["eval_loss_start"] = evals[0][1] if evals and evals[0][0] == 0 else None
    r["eval_loss"] = evals[-1][1] if evals else None
    r["eval_start"] = {k: v[0][1] for k, v in c["metrics"].items() if v and v[0][0] == 0}
    r["eval"] = {k: v[-1][1] for k, v in c["metrics"].items() if v}
    r["best"] = {
        k: (max if HIGHER_IS_BETTER.get(k, True) else min)(x for s, x in v if s > 0)
        for k, v in c["metrics"].items()
        if any(s > 0 for s, _ in v)
    }
    if evals and any(s > 0 for s, _ in evals):
        r["best"]["loss"] = min(x for s, x in evals if s > 0)
    r["selection"] = _selection(r, metric)


def _selection(r: dict, metric: str) -> float | None:
    """The value that ranks a run: its final eval `metric` (loss: eval loss, or without eval data train loss)."""
    if metric == "loss":
        return r["eval_loss"] if r["eval_loss"] is not None else r["final_loss"]
    return r["eval"].get(metric)


def _choose_rates(by_rate: dict[tuple, list[dict]], metric: str) -> dict[str, float]:
    """Each method's rate: among its rates run with the most seeds (a search's runs with one seed are not chosen
    from), the one with the fewest diverged seeds, then the best mean selection value over the others."""
    best_lr: dict[str, float] = {}
    chosen: dict[str, tuple] = {}
    for (group, lr), runs in by_rate.items():
        value = (mean_std([r["selection"] for r in runs if not r["diverged"]]) or {}).get("mean")
        key = (len(runs), -sum(r["diverged"] for r in runs))
        if (
            group not in best_lr
            or key > chosen[group][0]
            or (key == chosen[group][0] and better(metric, value, chosen[group][1]))
        ):
            best_lr[group], chosen[group] = lr, (key, value)
    return best_lr


def _targets(best: list[dict], target_loss: float | None, metric: str, target_metric: float | None):
    """(the targets of "steps to reach", the final train losses and the final eval losses of the chosen runs)."""
    finals = [r["final_loss"] for r in best if r["final_loss"] is not None]
    evals = [r["eval_loss"] for r in best if r["eval_loss"] is not None]
    values = [v for r in best if metric != "loss" and (v := r["eval"].get(metric)) is not None]
    worst = min if HIGHER_IS_BETTER[metric] else max
    goal = {
        "train": target_loss if target_loss is not None else max(finals, default=None),
        "eval": target_loss if target_loss is not None else max(evals, default=None),
        "given": target_loss is not None,
        "metric_name": metric,
        "metric": target_metric if target_metric is not None else worst(values, default=None),
    }
    return goal, finals, evals


def _row(group: str, lr: float, runs: list[dict], best_lr: dict) -> dict:
    """The summary record of one method at one rate: mean ± std over its seeds whose runs did not diverge (the
    seeds of those that did: "diverged")."""
    kept = [r for r in runs if not r["diverged"]]
    names = sorted({k for r in kept for k in r["eval"]})
    return {
        "run": group,
        "method": runs[0]["method"],
        "progressive": runs[0]["progressive"],
        "lr": lr,
        "best_lr": lr == best_lr[group],
        "seeds": [r["seed"] for r in runs],
        "runs": [r["run"] for r in runs],
        "diverged": [r["seed"] for r in runs if r["diverged"]],
        "trainable_parameters": next((r["trainable_parameters"] for r in runs if r["trainable_parameters"]), None),
        **{k: mean_std([r[k] for r in kept]) for k in STATS},
        "reached": {k: sum(r[k] is not None for r in kept) for k in STATS if k.startswith("steps_to")},
        "eval": {k: mean_std([r["eval"].get(k) for r in kept]) for k in names},
        "best": {k: mean_std([r["best"].get(k) for r in kept]) for k in names},
    }


def verdicts(records: list[dict], summary: list[dict], best_lr: dict, plan) -> tuple[dict, list]:
    """Where each method's chosen rate sits among the rates it tried, and each method against the baseline at their
    chosen rates, paired by seed (runs that diverged left out): `statistics.difference`, with the metric's mean
    and, for accuracy, its binomial standard error on the eval rows.

    Returns:
        ({group: "highest" / "lowest" / "only" / None}, [one record per group]).
    """
    tried: dict[str, set] = {}
    for r in records:
        tried.setdefault(group_name(r["method"], r["progressive"]), set()).add(r["lr"])
    edges = {g: edge(lr, sorted(tried[g])) for g, lr in best_lr.items()}
    higher = HIGHER_IS_BETTER[plan.metric]
    chosen = {(g, lr) for g, lr in best_lr.items()}
    values: dict[str, dict] = {}
    for r in records:
        g = group_name(r["method"], r["progressive"])
        if (g, r["lr"]) in chosen and r.get("search_steps") is None and not r["diverged"]:
            values.setdefault(g, {})[r["seed"]] = r["selection"]
    rows = []
    for row in (row for row in summary if row["best_lr"]):
        g, base = row["run"], group_name(plan.baseline, row["progressive"] if plan.baseline != "bitfit" else None)
        mean = (row["selection"] or {}).get("mean")
        out = {
            "run": g,
            "lr": row["lr"],
            "edge": edges[g],
            "seeds": len(row["seeds"]),
            "diverged": row["diverged"],
            "baseline": base,
            "value": mean,
            "binomial_se": (
                binomial_se(mean, plan.eval_rows)
                if plan.metric == "accuracy" and plan.eval_rows and mean is not None
                else None
            ),
        }
        if g == base or base not in values:
            out.update(verdict="baseline" if g == base else "no baseline")
        else:
            d = difference(values.get(g, {}), values[base], higher=higher, interval=plan.interval)
            out.update({k: v for k, v in d.items() if k != "seeds"}, paired_seeds=d["seeds"])
        rows.append(out)
    return edges, rows
