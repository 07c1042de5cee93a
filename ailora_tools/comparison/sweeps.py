"""What a comparison's runs are called and which rates and seeds they sweep: compare's method names (an init method,
"bitfit", "dora", "METHOD+dora"), run directories, `--lr` and `--seeds`."""

from __future__ import annotations

import json
import math

from ..errors import OptionError

#: the methods compared by default, in this order, when this version has them
DEFAULT_METHODS = ("lora", "pissa", "milora", "ailora", "lora-da")
#: not an init method: `train --bitfit` on the model itself (no decompose; no progressive variant)
BITFIT = "bitfit"
#: "dora" is plain DoRA (`decompose --method lora --dora`); "METHOD+dora" is METHOD's init with DoRA's magnitudes
DORA = "dora"


def init_of(run_method: str) -> tuple[str, bool]:
    """(init method, DoRA) of a compare method name: "dora" -> ("lora", True), "pissa+dora" -> ("pissa", True)."""
    if run_method == DORA:
        return "lora", True
    method, plus, rest = run_method.partition("+")
    return method, bool(plus) and rest == DORA


def run_name(method: str, progressive: int | None, lr: float | None, seed: int | None) -> str:
    """A run's directory: METHOD[-progressiveK][-lrRATE][-seedS] (rate and seed only when swept)."""
    return (
        method
        + (f"-progressive{progressive}" if progressive else "")
        + (f"-lr{lr:g}" if lr is not None else "")
        + (f"-seed{seed}" if seed is not None else "")
    )


def group_name(method: str, progressive: int | None) -> str:
    """What a method's runs share across rates and seeds: METHOD[-progressiveK]."""
    return run_name(method, progressive, None, None)


def parse_lrs(spec, methods: list[str], default: float) -> dict[str, list[float]]:
    """Learning rates per method from `--lr`: None (every method `default`), a rate, a list of rates (every method
    each), a mapping method -> rate(s), or text: "1e-4,5e-4" (every method each), "pissa=1e-4,lora=5e-4" (per
    method; a method named twice gets both; plain rates mixed in apply to methods not named; methods neither
    named nor given plain rates get `default`).

    Raises:
        OptionError: a rate that is not a positive number, a method not compared.
    """
    plain, per = [], {}
    if spec is None:
        pass
    elif isinstance(spec, dict):
        per = {m: list(v) if isinstance(v, (list, tuple)) else [v] for m, v in spec.items()}
    elif isinstance(spec, (list, tuple)):
        plain = list(spec)
    elif isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, value = part.rpartition("=")
            (per.setdefault(name.strip(), []) if sep else plain).append(value.strip())
    else:
        plain = [spec]
    text = spec if isinstance(spec, str) else json.dumps(spec, default=str)
    unknown = sorted(set(per) - set(methods))
    if unknown:
        raise OptionError(f"--lr {text}: {', '.join(unknown)} is not among the compared methods ({', '.join(methods)})")
    out = {}
    for m in methods:
        rates = []
        for v in per.get(m) or plain or [default]:
            try:
                rate = float(v)
            except (TypeError, ValueError):
                raise OptionError(
                    f"--lr {text}: {v!r} is not a number; give rates (1e-4,5e-4) or METHOD=RATE pairs"
                ) from None
            if not math.isfinite(rate) or rate <= 0:
                raise OptionError(f"--lr {text}: rate {v} must be a finite number greater than 0")
            if rate not in rates:
                rates.append(rate)
        out[m] = rates
    return out


def parse_seeds(spec) -> list[int] | None:
    """`--seeds`: "0,1,2" or a list of integers, each once; None when not given.

    Raises:
        OptionError: not integers, or one given twice.
    """
    if spec is None:
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    try:
        seeds = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise OptionError(f"--seeds {spec}: give integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(str(p).strip() != str(s) for p, s in zip(parts, seeds)):
        raise OptionError(f"--seeds {spec}: give integers, each once, e.g. 0,1,2")
    return seeds
