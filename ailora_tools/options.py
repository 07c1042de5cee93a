"""Range checks of option values, shared by the library and the CLI: each failure names the option.

Every public function checks its numbers before it reads or writes anything, so `decompose(alpha=0)` and
`ailora-tools decompose --alpha 0` fail the same way: one line, nothing written.
"""
from __future__ import annotations

import math

from .errors import OptionError


def at_least(flag: str, value: float | None, low: float) -> None:
    """`value` is None (not given) or a finite number ≥ `low`."""
    if value is not None and not (_finite(value) and value >= low):
        raise OptionError(f"{flag} {value}: must be at least {low}")


def positive(flag: str, value: float | None) -> None:
    """`value` is None (not given) or a finite number > 0."""
    if value is not None and not (_finite(value) and value > 0):
        raise OptionError(f"{flag} {value}: must be greater than 0")


def choice(flag: str, value: str | None, allowed) -> None:
    """`value` is None or one of `allowed`."""
    if value is not None and value not in allowed:
        raise OptionError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
