"""A training run's curves as compare reads them: losses and metrics per step, smoothed, the step a target is
reached, and the mean ± std over seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def read_curves(metrics: Path) -> dict:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)], "metrics": {name: [(step, eval_<name>)]}} from a train
    output's metrics.jsonl (last row per step; None values, such as an undefined correlation, are left out)."""
    train, evals, scores = {}, {}, {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
        for key, value in row.items():
            if key.startswith("eval_") and key != "eval_loss":
                scores.setdefault(key.removeprefix("eval_"), {})[row["step"]] = value
    return {
        "train": sorted(train.items()),
        "eval": sorted(evals.items()),
        "metrics": {k: sorted((s, v) for s, v in c.items() if v is not None) for k, c in scores.items()},
    }


def trailing_mean(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each (step, value) with the value averaged with up to `window` − 1 values before it."""
    out, total = [], 0.0
    for i, (step, v) in enumerate(curve):
        total += v - (curve[i - window][1] if i >= window else 0.0)
        out.append((step, total / min(i + 1, window)))
    return out


def steps_to_reach(curve: list[tuple[int, float]], target: float, *, higher: bool = False) -> int | None:
    """The first step whose value is at or below `target` (at or above with `higher`), or None."""
    return next((step for step, v in curve if (v >= target if higher else v <= target)), None)


def mean_std(values: list) -> dict | None:
    """{"mean", "std", "n"} of the values that are not None (std over seeds: the sample's, 0 for one value)."""
    vs = [v for v in values if v is not None]
    if not vs:
        return None
    return {"mean": statistics.fmean(vs), "std": statistics.stdev(vs) if len(vs) > 1 else 0.0, "n": len(vs)}
