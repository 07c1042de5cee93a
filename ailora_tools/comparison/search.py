"""`--lr auto`: each method's learning rate searched on a log-spaced grid that grows toward the better side while
the best rate sits at an edge, then the best few rates run with every seed.

The first grid is three rates around the method's family's centre (`FAMILIES`), `factor` apart; a rate that
diverges (loss not finite or above its start) ranks below every rate that did not. The search runs one seed
(the first) and, with `steps`, fewer steps; the `keep` best rates then run with every seed, and the best mean
over seeds is the method's rate. Rates lie on the lattice centre × factor^k (3 significant digits), so a search
replayed from its journal (`--resume`) tries the same rates in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .sweeps import BITFIT, init_of

#: first-grid centre per method family: plain and DoRA-style adapters start at B = 0 (1e-3, the LoRA papers'
#: range); inits whose adapter holds W's principal directions want smaller rates (arXiv 2602.04998: PiSSA's top
#: Hessian eigenvalue is larger); BitFit trains biases only and wants larger ones
FAMILIES = {"adapter": 1e-3, "principal": 10**-3.5, "bitfit": 1e-2}
PRINCIPAL = ("pissa", "olora", "corda")
#: `--lr-factor` default: √10 (two rates a decade); 2 is the finer choice
FACTOR = math.sqrt(10)
#: `--lr-max-rates` default: rates one method's search may try
MAX_RATES = 7
#: `--search-keep` default: rates run with every seed
KEEP = 2


@dataclass(frozen=True)
class SearchSpec:
    """How `--lr auto` searches: the factor between rates, the most rates per method, how many of the best run
    every seed, the search runs' steps (None: the comparison's own) and the first grid's centre (None: the
    method's family's)."""

    factor: float = FACTOR
    max_rates: int = MAX_RATES
    keep: int = KEEP
    steps: int | None = None
    center: float | None = None

    @classmethod
    def take(cls, settings: dict) -> SearchSpec:
        """The spec `compare`'s settings give (`lr_factor`, `lr_max_rates`, `search_keep`, `search_steps`,
        `lr_center`), those keys removed from `settings`."""
        return cls(**{field: settings.pop(name) for name, field in SETTINGS.items() if name in settings})


#: compare's settings (and flags) for a `SearchSpec`'s fields
SETTINGS = {
    "lr_factor": "factor",
    "lr_max_rates": "max_rates",
    "search_keep": "keep",
    "search_steps": "steps",
    "lr_center": "center",
}


def family(method: str) -> str:
    """The family that sets a compare method's first grid: bitfit, principal (PISSA-like inits) or adapter."""
    if method == BITFIT:
        return "bitfit"
    return "principal" if init_of(method)[0] in PRINCIPAL else "adapter"


def rate(method: str, k: int, spec: SearchSpec) -> float:
    """The k-th rate of a method's lattice: the centre (its family's by default) × factor^k, to 3 significant
    digits."""
    return float(f"{(spec.center or FAMILIES[family(method)]) * spec.factor**k:.3g}")


def first_grid(method: str, spec: SearchSpec) -> list[float]:
    """The rates a method's search starts with: the centre and one step either side."""
    return [rate(method, k, spec) for k in (-1, 0, 1)]


def rank(value: float | None, higher: bool) -> tuple:
    """A run's sort key, larger is better: a value beats none (diverged), then the metric's better direction."""
    return (value is not None, (value if higher else -value) if value is not None else 0.0)


def search(method: str, evaluate: Callable[[float], float | None], spec: SearchSpec, *, higher: bool) -> list[dict]:
    """Try the first grid, then one rate beyond the edge the best sits at, until the best is inside the rates tried
    (a tie counts as inside when one of the tied rates is) or `spec.max_rates` are tried.

    Args:
        evaluate: a rate -> its selection value, None if the run diverged.

    Returns:
        The path: [{"lr", "value", "k"}] in the order tried.
    """
    path = [{"lr": rate(method, k, spec), "k": k} for k in (-1, 0, 1)]
    for p in path:
        p["value"] = evaluate(p["lr"])
    while len(path) < spec.max_rates:
        side = edge_of_best(path, higher)
        if side is None:
            break
        k = (max if side == "highest" else min)(p["k"] for p in path) + (1 if side == "highest" else -1)
        lr = rate(method, k, spec)
        path.append({"lr": lr, "k": k, "value": evaluate(lr)})
    return path


def edge_of_best(path: list[dict], higher: bool) -> str | None:
    """ "highest" or "lowest" when the best of the rates tried is at that edge (every best, if tied; "lowest"
    when every rate diverged), else None."""
    top = max(rank(p["value"], higher) for p in path)
    if top[0] is False:  # every rate diverged: lower
        return "lowest"
    best = {p["lr"] for p in path if rank(p["value"], higher) == top}
    lrs = sorted(p["lr"] for p in path)
    if best - {lrs[0], lrs[-1]}:
        return None
    return "highest" if lrs[-1] in best else "lowest"


def kept(path: list[dict], keep: int, higher: bool) -> list[float]:
    """The `keep` best rates of a search (ties: the lower rate first), in increasing order."""
    order = sorted(path, key=lambda p: (rank(p["value"], higher), -p["lr"]), reverse=True)
    return sorted(p["lr"] for p in order[:keep])


def edge(chosen: float, tried: list[float]) -> str | None:
    """Where the chosen rate sits among the rates tried: "highest", "lowest", "only" (a single rate) or None
    (inside)."""
    if len(set(tried)) < 2:
        return "only"
    return "highest" if chosen == max(tried) else "lowest" if chosen == min(tried) else None
