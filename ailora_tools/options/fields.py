"""How an option is declared: a dataclass field carrying its default, help text and range, checked on construction.

A field's metadata gives the command-line option too (`cli.options` generates it): the flag (`flag(name)` unless
`cli` says otherwise), `short` (`-o`), `required`, `choices`, `metavar`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, field, fields

from ..errors import OptionError


def option(
    default,
    help: str,
    *,
    low: float | None = None,
    above: float | None = None,
    choices=None,
    metavar: str | None = None,
    cli: str | None = None,
    short: str | None = None,
    required: bool = False,
):
    """A field with its help text and checks: `low` (≥), `above` (>), `choices`; None always passes. `cli`: the
    command-line flag when it is not the field's name with dashes (`roles` is the repeatable `--role`); `short`: a
    one-letter alias (`-o`); `required`: the command needs it (the library takes it as an argument)."""
    meta = {
        "help": help,
        "low": low,
        "above": above,
        "choices": choices,
        "metavar": metavar,
        "cli": cli,
        "short": short,
        "required": required,
    }
    if isinstance(default, (dict, list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line spelling of a field: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


class Options:
    """Base of the option dataclasses: checks every field on construction, builds from keyword arguments."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f.name, getattr(self, f.name), **{k: f.metadata.get(k) for k in ("low", "above", "choices")})

    @classmethod
    def build(cls, options: Options | None = None, /, **settings):
        """`options` (or the defaults) with `settings` replacing fields; an unknown keyword is an OptionError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise OptionError(f"{cls.__name__} has no setting {', '.join(unknown)}; it has {', '.join(sorted(names))}")
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options is not None else {}
        return cls(**{**base, **settings})

    @classmethod
    def defaults(cls) -> dict:
        """Field name -> default value."""
        return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}

    def kwargs(self) -> dict:
        """Field name -> value: the keyword arguments of the library function these options are for."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check(name: str, value, *, low=None, above=None, choices=None) -> None:
    """One value against its range; raises OptionError naming `name` (a field name; a flag such as `--max-rank` is
    read as its field, `max_rank`)."""
    if value is None:
        return
    key = "{" + name.lstrip("-").replace("-", "_") + "}"
    if choices is not None and value not in choices:
        raise OptionError(f"{key} {value!r}: choose one of {', '.join(choices)}")
    if (low is not None or above is not None) and not _finite(value):
        raise OptionError(f"{key} {value}: must be a finite number")
    if low is not None and value < low:
        raise OptionError(f"{key} {value}: must be at least {low:g}")
    if above is not None and not value > above:
        raise OptionError(f"{key} {value}: must be greater than {above:g}")


def at_least(name: str, value: float | None, low: float) -> None:
    """`value` is None (not given) or a finite number ≥ `low`."""
    check(name, value, low=low)


def choice(name: str, value: str | None, allowed) -> None:
    """`value` is None or one of `allowed`."""
    check(name, value, choices=allowed)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
