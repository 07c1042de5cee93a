"""Which runs a comparison makes, in order: the plan's runs, or with `--lr auto` each method's search (its grid
grown toward the better side with one seed) and then its best rates with every seed. Each run happens once; a
search replayed from the journal (`--resume`) reads the values its finished runs had, so it takes the same path."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

from ..training.metrics import HIGHER_IS_BETTER
from .costs import bounds_by_length, estimate, length_kind
from .curves import trailing_mean
from .plan import ComparePlan, Run
from .search import kept, search
from .summary import measure
from .sweeps import BITFIT, group_name


def schedule(
    plan: ComparePlan,
    execute: Callable[[Run], dict],
    curves: Callable[[dict], dict],
    *,
    smooth: int,
    bar,
    progress: bool,
) -> tuple[list[dict], dict]:
    """Run the comparison: `execute` makes one run (or reads it from the journal) and returns its record,
    `curves` reads a record's curves.

    Returns:
        (every run's record in the order made, {group: {"path": [{"lr", "k", "value"}], "kept": [rates]}} for
        `--lr auto`, else {}).
    """
    done: dict[str, dict] = {}
    lengths = bounds_by_length(plan)  # each length's first run is timed: a search's shorter runs say little of the rest
    split = len(lengths) > 1

    def once(run: Run) -> dict:
        key = (run.method, run.progressive, run.lr, run.seed, run.steps)
        if key not in done:
            done[key] = execute(run)
            bar.total = max(bar.total or 0, len(done))
            bar.update(1)
            if progress and run.steps in lengths:
                low, high = lengths.pop(run.steps)
                tqdm.write(estimate(done[key], low - 1, high - 1, length_kind(run.steps, split)), file=sys.stderr)
        return done[key]

    if plan.search is None:
        for run in plan.runs:
            once(run)
        return list(done.values()), {}
    higher = HIGHER_IS_BETTER[plan.metric]
    spec, seeds = plan.search, plan.seeds or [None]

    def value(record: dict) -> float | None:
        r = dict(record)
        c = curves(record)
        measure(r, c, trailing_mean(c["train"], smooth), plan.metric)
        return None if r["diverged"] else r["selection"]

    searches = {}
    progressive = next((r.progressive for r in plan.runs if r.progressive), None)
    groups = [(m, None) for m in plan.methods] + [(m, progressive) for m in plan.methods if progressive and m != BITFIT]
    for method, k in groups:
        path = search(
            method, lambda lr, m=method, k=k: value(once(Run(m, k, lr, seeds[0], spec.steps))), spec, higher=higher
        )
        best = kept(path, spec.keep, higher)
        for lr in best:
            for seed in seeds:
                once(Run(method, k, lr, seed))
        searches[group_name(method, k)] = {"path": path, "kept": best}
    return list(done.values()), searches
