"""What a comparison will cost, said before it runs: how many runs (a range with `--lr auto`, whose searches may
grow), about how long from the first run's speed, and the plan itself for `--dry-run`."""

from __future__ import annotations

from .plan import ComparePlan


def run_bounds(plan: ComparePlan) -> tuple[int, int]:
    """(fewest, most) runs the plan makes, every length together (`bounds_by_length`)."""
    bounds = bounds_by_length(plan).values()
    return sum(low for low, _ in bounds), sum(high for _, high in bounds)


def bounds_by_length(plan: ComparePlan) -> dict[int | None, tuple[int, int]]:
    """{steps: (fewest, most) runs of that length}; None is the comparison's own length. Without a search: its runs.
    With one, per method its first grid (3 rates) to `max_rates` with the first seed, plus its `keep` best rates with
    the other seeds; with `--search-steps` the searches' shorter runs are counted apart, and the kept rates run every
    seed (the first again) at full length."""
    if plan.search is None:
        return {None: (len(plan.runs), len(plan.runs))}
    groups, spec, seeds = len(plan.runs) // 3, plan.search, len(plan.seeds or [None])
    low, high = groups * 3, groups * spec.max_rates
    if spec.steps:
        full = groups * spec.keep * seeds
        return {spec.steps: (low, high), None: (full, full)}
    rest = groups * spec.keep * (seeds - 1)
    return {None: (low + rest, high + rest)}


def estimate(first: dict, low: int, high: int, kind: str = "run") -> str:
    """A line: the first `kind` run's time and roughly how long the other `low` (to `high`) of that kind will
    take."""
    seconds = (first.get("train_seconds") or 0.0) + (first.get("decompose_seconds") or 0.0)
    left = f"{_duration(seconds * low)}" + (f" to {_duration(seconds * high)}" if high != low else "")
    runs = f"{low}" + (f" to {high}" if high != low else "")
    plural = "" if high == 1 else "s"
    return f"compare: the first {kind} took {seconds:.0f} s; the other {runs} {kind}{plural}: about {left}"


def length_kind(steps: int | None, split: bool) -> str:
    """How `estimate` names a run of `steps` steps (None: the comparison's length) when `split` lengths are timed
    apart."""
    if not split:
        return "run"
    return f"{steps}-step search run" if steps else "full-length run"


def describe(plan: ComparePlan) -> str:
    """The plan in words: what every run shares, the runs (or each method's search), how many."""
    low, high = run_bounds(plan)
    t = plan.training
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"
    seeds = ", ".join(map(str, plan.seeds)) if plan.seeds else str(t.seed)
    lines = [
        f"compare {', '.join(plan.methods)} on {plan.model}: {length}, seeds {seeds}, metric {plan.metric}, "
        f"baseline {plan.baseline}"
    ]
    if plan.search is None:
        lines += [
            f"  {r.method}{f' progressive {r.progressive}' if r.progressive else ''}: lr {r.lr:g}, seed "
            f"{r.seed if r.seed is not None else t.seed}"
            for r in plan.runs
        ]
    else:
        s = plan.search
        steps = f"{s.steps} steps" if s.steps else length
        for r in plan.runs[::3]:
            grid = ", ".join(f"{x.lr:g}" for x in plan.runs if (x.method, x.progressive) == (r.method, r.progressive))
            lines.append(
                f"  {r.method}{f' progressive {r.progressive}' if r.progressive else ''}: search from lr "
                f"{grid} (×{s.factor:.3g} beyond the edge the best sits at, up to {s.max_rates} rates; seed "
                f"{r.seed if r.seed is not None else t.seed}, {steps}), then its {s.keep} best with seeds "
                f"{seeds}"
            )
    lines.append(f"{low} runs" if low == high else f"{low} to {high} runs")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
