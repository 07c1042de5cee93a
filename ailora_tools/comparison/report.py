"""A comparison's report: compare.md (settings, one row per method at its chosen rate, every rate of a sweep) and
its plots against step."""

from __future__ import annotations

from ..analysis.plots import band_figure
from ..io.output import OutputDir
from .sweeps import group_name

REPORT_NAME = "compare.md"
PLOT_TRAIN, PLOT_EVAL = "train_loss.png", "eval_loss.png"


def report(
    summary: list[dict],
    best_lr: dict,
    goal: dict,
    settings: dict,
    plots: list[str],
    smooth: int,
    metric: str = "loss",
    extra: dict | None = None,
) -> str:
    """The markdown report: settings, one table row per method at its chosen rate (mean ± std over seeds), each
    method against the baseline (`extra["verdicts"]`), chosen rates at an edge of those tried, every rate of a
    sweep, each method's search (`extra["searches"]`), the plots."""
    extra = extra or {"verdicts": [], "edges": {}, "searches": {}}
    rates = sorted({row["lr"] for row in summary})
    chosen = [row for row in summary if row["best_lr"]]
    names = sorted({k for row in chosen for k in row["eval"]}, key=lambda k: (k != metric, k))
    tried = sorted(set(rates) | {p["lr"] for s in extra["searches"].values() for p in s["path"]})
    lines = _preamble(goal, settings, tried, smooth, metric)
    if len(rates) > 1:
        lines += [
            f"Each method at its best learning rate by final eval {metric} (all rates below and in compare.json).",
            "",
        ]
    head = [
        "run",
        "lr",
        "trainable params",
        "first train loss",
        "final train loss",
        "steps to train target",
        "eval loss start",
        "final eval loss",
        "steps to eval target",
    ]
    for k in names:
        head += [f"final {k}", f"best {k}"] + ([f"steps to {k} target"] if k == metric else [])
    head += ["train s", "decompose s"]
    lines += ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    lines += ["| " + " | ".join(_cells(row, names, goal, metric)) + " |" for row in chosen]
    lines.append("")
    lines += verdict_lines(extra["verdicts"], metric, settings) + edge_lines(extra["edges"], bool(extra["searches"]))
    if len(rates) > 1:
        what = f"final eval {metric}" if metric != "loss" else "final eval loss (train loss without eval data)"
        lines += [
            f"## Learning rates: {what}",
            "",
            "| run | lr | " + what + " | chosen |",
            "| --- | ---: | ---: | --- |",
        ]
        lines += [
            f"| {row['run']} | {row['lr']:g} | {_num(row['selection'])}"
            + (f" ({len(row['diverged'])} diverged)" if row["diverged"] else "")
            + f" | {'yes' if row['best_lr'] else ''} |"
            for row in summary
        ]
        lines.append("")
    lines += search_lines(extra["searches"], best_lr, metric)
    lines += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def verdict_lines(rows: list[dict], metric: str, settings: dict) -> list[str]:
    """The table of each method against the baseline: paired difference, its interval, the verdict."""
    if not rows:
        return []
    base = next((r["baseline"] for r in rows), "")
    how = "bootstrap" if settings.get("interval") == "bootstrap" else "t"
    lines = [
        f"## Against {base}: final eval {metric if metric != 'loss' else 'loss'} at each method's chosen rate",
        "",
        f"Paired by seed (same seed: same data order); 95% interval of the mean difference ({how}); runs that "
        "diverged (a loss not finite, or a final loss above the first) are left out and counted."
        + (" ± is the binomial standard error of the accuracy on the eval rows." if metric == "accuracy" else ""),
        "",
        f"| run | lr | {metric} | seeds | diverged | difference | 95% interval | verdict | seeds to resolve |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in rows:
        value = _num(r["value"]) + (f" ± {r['binomial_se']:.4f}" if r["binomial_se"] is not None else "")
        interval = f"[{r['low']:+.4f}, {r['high']:+.4f}]" if r.get("low") is not None else ""
        diff = f"{r['mean']:+.4f}" if r.get("mean") is not None else ""
        needed = (
            ""
            if r["verdict"] in ("baseline", "no baseline")
            else (
                str(r["seeds_needed"])
                if r.get("seeds_needed")
                else "—"
                if r.get("mean") == 0
                else "> 1000"
                if r.get("std") is not None
                else ""
            )
        )
        edge = " (edge)" if r["edge"] in ("highest", "lowest") else ""
        lines.append(
            f"| {r['run']} | {r['lr']:g}{edge} | {value} | {r['seeds']} | {len(r['diverged'])} | {diff} | "
            f"{interval} | {r['verdict']} | {needed} |"
        )
    return [*lines, ""]


def edge_lines(edges: dict, searched: bool) -> list[str]:
    """A warning for every chosen rate at an edge of the rates tried (the best may lie beyond)."""
    at = [f"{g} ({where})" for g, where in edges.items() if where in ("highest", "lowest")]
    only = [g for g, where in edges.items() if where == "only"]
    lines = []
    if at:
        lines.append(
            f"**Chosen rate at an edge of the rates tried** (the best may lie beyond it): {', '.join(at)}"
            + ("; the search stopped at --lr-max-rates." if searched else "; widen --lr or use --lr auto.")
        )
    if only:
        lines.append(f"One rate only, not tuned: {', '.join(only)} (a sweep or --lr auto tunes it).")
    return [*lines, ""] if lines else []


def search_lines(searches: dict, best_lr: dict, metric: str) -> list[str]:
    """Each method's search: the rates in the order tried with their value (one seed), the rates kept for every
    seed, the chosen one."""
    if not searches:
        return []
    lines = [f"## Learning-rate search (--lr auto): final eval {metric}, first seed, in the order tried", ""]
    for g, s in searches.items():
        path = ", ".join(
            f"{p['lr']:g} → " + ("diverged" if p["value"] is None else f"{p['value']:.4f}") for p in s["path"]
        )
        lines.append(f"- {g}: {path}; kept {', '.join(f'{lr:g}' for lr in s['kept'])}; chosen {best_lr[g]:g}")
    return [*lines, ""]


def _searched(search: dict) -> str:
    """The end of the preamble's "lr auto (searched: ..." : how long the search's runs were."""
    return f"; {search['steps']}-step runs, the chosen rates at full length)" if search.get("steps") else ")"


def _preamble(goal: dict, settings: dict, rates: list[float], smooth: int, metric: str) -> list[str]:
    """The title and the settings the runs share, with the targets of "steps to reach"."""
    how = "given" if goal["given"] else "the highest final value among the methods at their chosen rates"
    length = f"{settings['max_steps']} steps" if settings["max_steps"] else f"{settings['epochs']} epoch(s)"
    lrs = "lr auto (searched: " if settings.get("search") else "lr "
    seeds = settings["seeds"]
    return [
        "# Initialisation comparison",
        "",
        f"Model `{settings['model']}`, data `{settings['data']}`"
        + (f", eval data `{settings['eval_data']}`" if settings["eval_data"] else "")
        + f"; task {settings['task']}; {length}, {lrs}{', '.join(f'{r:g}' for r in rates)}"
        + (_searched(settings["search"]) if settings.get("search") else "")
        + ", batch "
        f"{settings['batch_size']}×{settings['grad_accum']}, rank {settings['rank']}, targets "
        f"{', '.join(settings['targets'])}, "
        + (f"seeds {', '.join(map(str, seeds))} (mean ± std)" if seeds else f"seed {settings['seed']}")
        + ".",
        "",
        f"Train loss: a {smooth}-step trailing mean. Target loss ({how}): train {_num(goal['train'])}"
        + (f", eval {_num(goal['eval'])}" if goal["eval"] is not None else "")
        + "."
        + (f" Target {metric}: {_num(goal['metric'])}." if metric != "loss" and goal["metric"] is not None else ""),
        "",
    ]


def _cells(row: dict, names: list[str], goal: dict, metric: str) -> list[str]:
    """One method's row of the main table."""
    cells = [
        row["run"],
        f"{row['lr']:g}",
        _num(row["trainable_parameters"], "{:,}"),
        _num(row["first_loss"]),
        _num(row["final_loss"]),
        _steps(row, "steps_to_train_target", goal["train"]),
        _num(row["eval_loss_start"]),
        _num(row["eval_loss"]),
        _steps(row, "steps_to_eval_target", goal["eval"]),
    ]
    for k in names:
        cells += [_num(row["eval"].get(k)), _num(row["best"].get(k))]
        cells += [_steps(row, "steps_to_metric_target", goal["metric"])] if k == metric else []
    return cells + [_num(row["train_seconds"], "{:.1f}"), _num(row["decompose_seconds"], "{:.1f}")]


def _num(v, fmt="{:.4f}") -> str:
    if v is None:
        return ""
    if isinstance(v, dict):
        return fmt.format(v["mean"]) + (f" ± {fmt.format(v['std'])}" if v["n"] > 1 else "")
    return fmt.format(v)


def _steps(row: dict, key: str, target) -> str:
    n, total = row["reached"][key], len(row["seeds"])
    if target is None:
        return ""
    if not n:
        return "not reached"
    return _num(row[key], "{:.1f}" if total > 1 else "{:.0f}") + ("" if n == total else f" ({n}/{total} seeds)")


def write_plots(
    od: OutputDir,
    records: list[dict],
    best_lr: dict,
    curves: dict,
    smoothed: dict,
    goal: dict,
    smooth: int,
    metric: str,
) -> list[str]:
    """train_loss.png, eval_loss.png and eval_<metric>.png: each method at its chosen rate, the mean over seeds with
    a band of ± one standard deviation."""
    groups: dict[str, list[str]] = {}
    swept = any(len({r["lr"] for r in records if group_name(r["method"], r["progressive"]) == g}) > 1 for g in best_lr)
    for r in records:
        g = group_name(r["method"], r["progressive"])
        if r["lr"] == best_lr[g]:
            groups.setdefault(f"{g} (lr {r['lr']:g})" if swept else g, []).append(r["run"])
    written = []
    panels = [
        (
            PLOT_TRAIN,
            {label: [smoothed[run] for run in runs] for label, runs in groups.items()},
            f"Training loss ({smooth}-step trailing mean)" if smooth > 1 else "Training loss",
            "loss",
            goal["train"],
        ),
        (
            PLOT_EVAL,
            {label: [curves[run]["eval"] for run in runs] for label, runs in groups.items()},
            "Eval loss",
            "eval loss",
            goal["eval"],
        ),
    ]
    if metric != "loss":
        panels.append(
            (
                f"eval_{metric}.png",
                {label: [curves[run]["metrics"].get(metric, []) for run in runs] for label, runs in groups.items()},
                f"Eval {metric}",
                metric,
                goal["metric"],
            )
        )
    for name, series, title, ylabel, target in panels:
        series = {label: [c for c in cs if c] for label, cs in series.items()}
        if any(series.values()):
            with od.open_atomic(name) as f:
                band_figure(f, {k: v for k, v in series.items() if v}, title=title, ylabel=ylabel, target=target)
            written.append(name)
    return written
