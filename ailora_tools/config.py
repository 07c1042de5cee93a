"""Recipe files: TOML with a [decompose] and a [train] table whose keys are the commands' option names.

CLI flags given explicitly override the file. Lists become comma-separated values, and a
[decompose.roles] table becomes repeated --role NAME=ROLE.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import FormatError, InputNotFoundError


def load_recipe(path: str | Path, section: str) -> dict:
    """The `section` table of a recipe, with keys as click parameter names (dashes become underscores).

    Raises:
        InputNotFoundError: no such file. FormatError: bad TOML or no such table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"--config {path}: no such file")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"--config {path}: not valid TOML ({e})") from e
    if section not in doc:
        raise FormatError(f"--config {path}: no [{section}] table (it has: {', '.join(doc) or 'nothing'})")
    out = {}
    for key, value in doc[section].items():
        name = key.replace("-", "_")
        if name == "roles" and isinstance(value, dict):
            out[name] = tuple(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out
