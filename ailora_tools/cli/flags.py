"""Command-line options generated from the option dataclasses (`ailora_tools.options`), recipes, and errors
written in flags."""

from __future__ import annotations

import dataclasses
import typing

import click

from .. import options
from ..config import load_recipe
from ..errors import AiloraError
from ..init import METHODS
from ..options import flag

#: every option dataclass a command takes: their fields' flags spell OptionErrors
OPTION_CLASSES = (
    options.CompareOptions,
    options.DecomposeOptions,
    options.InitOptions,
    options.TrainOptions,
    options.ConvertOptions,
    options.MergeOptions,
    options.ExportGgufOptions,
    options.ExportBaseOptions,
    options.CheckOptions,
    options.PushOptions,
    options.SpectrumOptions,
    options.VerifyOptions,
    options.DemoOptions,
    options.Report,
    options.ServeCheckOptions,
)


def flag_of(name: str) -> str:
    """A field's command-line flag: its `cli` metadata where it has one (`roles` -> `--role`), else `flag(name)`."""
    for cls in OPTION_CLASSES:
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if f is not None and f.metadata.get("cli"):
            return f.metadata["cli"]
    return flag(name)


def in_flags(e: Exception) -> str:
    """An error's message, options written as the command line spells them."""
    return e.spelled(flag_of) if isinstance(e, AiloraError) else str(e)


def from_options(*classes, skip: tuple[str, ...] = (), help: dict[str, str] | None = None):
    """Click options generated from option dataclasses: one per field, first class first.

    The field's type gives the option's: bool a flag, a tuple a comma-separated list, a dict a repeatable NAME=VALUE,
    choices a click.Choice. `skip` leaves fields out; `help` replaces a field's help text for this command.
    """
    seen, decorators = set(skip), []
    for cls in classes:
        hints, defaults = typing.get_type_hints(cls), cls.defaults()
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                decorators.append(_click_option(f, hints[f.name], defaults[f.name], (help or {}).get(f.name)))

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def _click_option(f: dataclasses.Field, hint, default, help: str | None):
    meta = f.metadata
    kwargs = {
        "default": default,
        "help": help or meta["help"],
        "metavar": meta.get("metavar"),
        "required": meta.get("required", False),
    }
    kind = typing.get_origin(hint)
    base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if hint is bool:
        kwargs.update(is_flag=True)
    elif kind is tuple:
        kwargs.update(default=",".join(default), callback=_comma_list)
    elif kind is dict:
        kwargs.update(default=(), multiple=True, callback=_roles, show_default=False)
    elif meta.get("choices"):
        kwargs.update(type=click.Choice([str(c) for c in meta["choices"]]))
    else:
        kwargs.update(type=base[0])
    if kwargs["required"]:
        kwargs.update(default=None, show_default=False)
    if f.name == "method":
        kwargs.update(
            type=click.Choice(list(METHODS)), help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."
        )
    names = [n for n in (meta.get("short"), meta.get("cli") or flag(f.name)) if n]
    return click.option(*names, f.name, **kwargs)


def _comma_list(_ctx, _param, value) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip()) if isinstance(value, str) else tuple(value)


def _roles(_ctx, _param, values) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, role = v.partition("=")
        if not sep or not name or not role:
            raise click.BadParameter(f"{v!r}: expected NAME=principal|minor, e.g. k_proj=principal")
        out[name] = role
    return out


def split(cls, kwargs: dict):
    """The fields of option dataclass `cls` taken out of a command's keyword arguments, as one object."""
    return cls.build(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


def config_option(section: str):
    """--config FILE: a recipe's [section] table becomes the command's defaults; explicit flags win."""

    def load(ctx, _param, value):
        if value is not None:
            try:
                table = load_recipe(value, section)
            except AiloraError as e:
                raise click.BadParameter(str(e)) from e
            unknown = sorted(set(table) - {p.name for p in ctx.command.params} - {"model"})
            if unknown:
                raise click.BadParameter(
                    f"{value}: [{section}] has no option {', '.join(unknown)} (see `ailora-tools {section} --help`)"
                )
            ctx.default_map = {**(ctx.default_map or {}), **table}
        return value

    return click.option(
        "--config",
        type=click.Path(),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=load,
        help=f"Recipe TOML whose [{section}] table sets defaults (flags override).",
    )


def required_path(*decls: str, help: str):
    """A required option naming a path (the command checks it and says what is wrong with it)."""
    return click.option(*decls, required=True, type=click.Path(), help=help)
