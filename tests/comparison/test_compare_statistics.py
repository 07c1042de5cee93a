"""Issue #36: the statistics of a comparison (paired differences, their intervals against SciPy's own, verdicts on
synthetic methods made truly better or identical, seeds to resolve, binomial error, divergence) and the learning-rate
search's logic on a scripted objective whose optimum lies outside the first grid."""

import math
import random

import numpy as np
import pytest
from scipy import stats

from ailora_tools.comparison.search import SearchSpec, edge, first_grid, kept, search
from ailora_tools.comparison.statistics import (
    BETTER,
    TOO_FEW,
    UNRESOLVED,
    WORSE,
    binomial_se,
    difference,
    diverged,
    seeds_to_resolve,
)


def scripted(offset: float, seeds: range, noise: float = 0.01, shared: int = 7) -> tuple[dict, dict]:
    """Accuracies per seed of a baseline and of a method `offset` better: each seed's draw (data order, init) is
    shared by both methods, each method adds its own noise; `shared` numbers the experiment."""
    rng = random.Random(shared)
    base, method = {}, {}
    for s in seeds:
        common = rng.gauss(0.6, 0.05)
        base[s] = common + rng.gauss(0, noise)
        method[s] = common + offset + rng.gauss(0, noise)
    return method, base


def test_paired_t_interval_matches_scipy():
    method, base = scripted(0.01, range(6))
    d = difference(method, base, higher=True)
    diffs = np.array([method[s] - base[s] for s in range(6)])
    ref = stats.ttest_rel(list(method.values()), list(base.values())).confidence_interval(0.95)
    assert (d["low"], d["high"]) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert d["mean"] == pytest.approx(diffs.mean()) and d["std"] == pytest.approx(diffs.std(ddof=1))
    assert d["n"] == 6 and d["seeds"] == list(range(6))
    boot = difference(method, base, higher=True, interval="bootstrap")
    ref = stats.bootstrap((diffs,), np.mean, method="percentile", n_resamples=9999, rng=np.random.default_rng(0))
    assert (boot["low"], boot["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_a_method_made_better_is_found_and_identical_methods_are_not():
    method, base = scripted(0.05, range(5))
    assert difference(method, base, higher=True)["verdict"] == BETTER
    assert difference(base, method, higher=True)["verdict"] == WORSE
    # on a loss (lower is better) the same numbers read the other way
    assert difference(method, base, higher=False)["verdict"] == WORSE
    identical = difference(base, dict(base), higher=True)
    assert identical["verdict"] == UNRESOLVED and identical["mean"] == 0 and identical["seeds_needed"] is None
    # a small true offset under the seed noise: not resolved with 3 seeds, and it says how many would
    small, base = scripted(0.01, range(3))
    d = difference(small, base, higher=True)
    assert d["verdict"] == UNRESOLVED and d["seeds_needed"] > 3
    assert difference({0: 0.7}, {0: 0.6}, higher=True)["verdict"] == TOO_FEW
    # seeds only one side has (a diverged run left out) are not paired
    assert difference({0: 0.7, 1: 0.8, 2: 0.75}, {0: 0.6, 2: 0.65}, higher=True)["seeds"] == [0, 2]


def test_verdicts_over_many_synthetic_experiments_have_the_stated_error_rates():
    """Equal methods (seed noise only) are called different in about 5% of experiments, as a 95% interval should;
    a method 0.03 better with 5 seeds is found in nearly all."""
    null = [difference(*scripted(0.0, range(5), shared=k), higher=True)["verdict"] for k in range(1000)]
    assert 0.03 < 1 - null.count(UNRESOLVED) / len(null) < 0.07
    found = [difference(*scripted(0.03, range(5), shared=k), higher=True)["verdict"] for k in range(300)]
    assert found.count(BETTER) / len(found) > 0.9 and WORSE not in found


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    mean, std = 0.01, 0.02
    n = seeds_to_resolve(mean, std)
    half = lambda n: stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)  # noqa: E731
    assert half(n) < mean <= half(n - 1)
    assert seeds_to_resolve(0.0, 0.02) is None and seeds_to_resolve(0.01, 0.0) == 2
    assert seeds_to_resolve(1e-6, 1.0) is None  # beyond 1000 seeds


def test_binomial_error_and_divergence():
    assert binomial_se(0.6, 300) == pytest.approx(math.sqrt(0.6 * 0.4 / 300))
    assert diverged([1.1, 0.9, float("nan")], 0.9) and diverged([1.0, 1.2, 1.3], 1.2)
    assert not diverged([1.1, 1.0, 0.8], 0.9) and not diverged([], None)


def test_search_extends_past_the_edge_until_the_best_is_inside():
    """Scripted accuracy peaking at 0.03: the first grid (1e-4, 3.16e-4, 1e-3) has its best at the top, so the
    search climbs until a rate is worse, and the optimum ends inside the rates tried."""
    tried = []

    def accuracy(lr):
        tried.append(lr)
        return None if lr > 0.2 else 0.9 - 0.1 * abs(math.log10(lr / 0.03))

    spec = SearchSpec(factor=math.sqrt(10), max_rates=8, keep=2, center=10**-3.5)
    path = search("lora", accuracy, spec, higher=True)
    assert [p["lr"] for p in path] == tried == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 0.01, 0.0316, 0.1]
    assert kept(path, 2, True) == [0.01, 0.0316]
    assert edge(0.0316, tried) is None and edge(0.1, tried) == "highest" and edge(0.01, [0.01]) == "only"
    # a loss falling toward small rates, and divergence above: the search goes down
    path = search(
        "pissa", lambda lr: None if lr > 2e-3 else abs(math.log10(lr / 1e-6)), SearchSpec(factor=2), higher=False
    )
    lrs = [p["lr"] for p in path]
    assert lrs[:3] == first_grid("pissa", SearchSpec(factor=2)) and lrs[3:] == sorted(lrs[3:], reverse=True)
    assert len(path) == 7  # the cap: still at the lower edge, which the report flags
    assert edge(kept(path, 1, False)[0], lrs) == "lowest"
    # every rate diverging: it goes down too; ties with an inside rate stop it
    assert [p["lr"] for p in search("lora", lambda lr: None, SearchSpec(max_rates=4), higher=True)][3] < 3.16e-4
    assert len(search("lora", lambda lr: 0.5, SearchSpec(), higher=True)) == 3
