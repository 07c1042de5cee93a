"""A small text document read and parsed (a recipe's TOML, a model's config.json), with errors naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import FormatError, InputNotFoundError


def read_document(path: Path, parse: Callable[[str], object], *, missing: str, invalid: str):
    """`parse` of the file's text.

    Raises:
        InputNotFoundError: no such file (`missing` is the message). FormatError: `parse` raised a ValueError (as
            JSON's and TOML's decode errors are): `invalid`, then the parser's words.
    """
    if not path.is_file():
        raise InputNotFoundError(missing)
    try:
        return parse(path.read_text())
    except ValueError as e:
        raise FormatError(f"{invalid} ({e})") from e
