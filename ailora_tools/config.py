"""Recipe files: TOML with a [decompose] and a [train] table whose keys are the commands' option names.

CLI flags given explicitly override the file. Lists become comma-separated values, and a
[decompose.roles] table becomes repeated --role NAME=ROLE.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import FormatError
from .io.documents import read_document


def load_recipe(path: str | Path, section: str) -> dict:
    """The `section` table of a recipe, with keys as click parameter names (dashes become underscores).

    Raises:
        InputNotFoundError: no such file. FormatError: bad TOML or no such table.
    """
    path = Path(path)
    doc = read_document(
        path, tomllib.loads, missing=f"--config {path}: no such file", invalid=f"--config {path}: not valid TOML"
    )
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
