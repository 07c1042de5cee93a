"""Whether a method differs from a baseline by more than the noise: the mean of the per-seed differences in the
chosen metric, its 95% interval over seeds (Student's t, or a bootstrap, from SciPy), a verdict, the seeds that
would resolve the difference seen, and the binomial standard error of an accuracy measured on n eval rows."""

from __future__ import annotations

import math

#: the verdicts `difference` gives
BETTER, WORSE, UNRESOLVED, TOO_FEW = "better", "worse", "no resolvable difference", "too few seeds"
#: `compare --interval`
INTERVALS = ("t", "bootstrap")
CONFIDENCE = 0.95
#: `seeds_to_resolve` looks no further than this
MAX_SEEDS = 1000


def diverged(losses: list[float], final: float | None) -> bool:
    """Whether a run diverged: a training loss that is not finite, or its final (smoothed) loss above the first."""
    if not losses:
        return False
    return not all(math.isfinite(v) for v in losses) or final is None or not final <= losses[0]


def difference(method: dict, baseline: dict, *, higher: bool, interval: str = "t") -> dict:
    """The paired difference `method` − `baseline` over the seeds both have ({seed: value}; runs that diverged are
    left out before).

    Returns:
        {"n", "seeds", "mean", "std", "low", "high", "verdict", "seeds_needed"}: the mean difference and the sample
        standard deviation of the differences, the 95% interval (None below 2 seeds), the verdict (better / worse:
        the interval excludes 0, on the side `higher` says is better; else no resolvable difference; too few seeds
        below 2) and the seeds that would resolve the observed mean at this spread (`seeds_to_resolve`).
    """
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    n = len(diffs)
    out = {
        "n": n,
        "seeds": seeds,
        "mean": None,
        "std": None,
        "low": None,
        "high": None,
        "verdict": TOO_FEW,
        "seeds_needed": None,
    }
    if n == 0:
        return out
    mean = math.fsum(diffs) / n
    out["mean"] = mean
    if n < 2:
        return out
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    low, high = t_interval(diffs) if interval == "t" else bootstrap_interval(diffs)
    resolved = low > 0 or high < 0
    verdict = UNRESOLVED if not resolved else BETTER if (mean > 0) == higher else WORSE
    return {
        **out,
        "std": std,
        "low": low,
        "high": high,
        "verdict": verdict,
        "seeds_needed": seeds_to_resolve(mean, std),
    }


def t_interval(diffs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student's t interval of the mean of `diffs` (at least 2 values; a point when they are all equal)."""
    from scipy import stats

    n = len(diffs)
    mean = math.fsum(diffs) / n
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(diffs: list[float], confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """SciPy's percentile bootstrap interval of the mean of `diffs` (9999 resamples, fixed seed; a point when the
    values are all equal)."""
    import numpy as np
    from scipy import stats

    if max(diffs) == min(diffs):
        return diffs[0], diffs[0]
    res = stats.bootstrap(
        (np.asarray(diffs, dtype=float),),
        np.mean,
        confidence_level=confidence,
        method="percentile",
        n_resamples=9999,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def seeds_to_resolve(mean: float, std: float, confidence: float = CONFIDENCE) -> int | None:
    """The fewest seeds n (≥ 2) whose t interval, at this mean and spread of the differences, excludes 0; None if
    the mean is 0 or more than `MAX_SEEDS` would be needed."""
    from scipy import stats

    if mean == 0:
        return None
    if std == 0:
        return 2
    import numpy as np

    n = np.arange(2, MAX_SEEDS + 1)
    resolved = np.flatnonzero(stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n) < abs(mean))
    return int(n[resolved[0]]) if resolved.size else None


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error √(p(1 − p)/n) of an accuracy p measured on n eval rows."""
    return math.sqrt(accuracy * (1 - accuracy) / n)
