"""Data files as rows of named columns: JSONL, CSV, TSV, Parquet and `datasets` directories (`save_to_disk`).

`rows(path, flag)` yields (position, row dict) for every example: the line number for JSONL, CSV and TSV (the
header is line 1), the 1-based row for Parquet and `datasets` directories, so that errors name the place to fix.
`task_rows` and `read` give them as the training tasks read them (`Columns` names the text, pair and label
columns), each error naming the file and line. CSV and TSV cells, and how a TSV is quoted: `delimited`.
The format comes from the suffix (`.jsonl`/`.json`, `.csv`, `.tsv`/`.tab`, `.parquet`/`.pq`) or, for a directory,
from `datasets`' `dataset_info.json`/`state.json`. Parquet needs `pyarrow`; a `datasets` directory needs the
optional `datasets` package (`pip install datasets`): each is asked for only when such a file is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import FormatError, InputNotFoundError, UnsupportedError
from . import delimited

JSONL, CSV, TSV, PARQUET, DATASETS = "jsonl", "csv", "tsv", "parquet", "datasets"
SUFFIXES = {".jsonl": JSONL, ".json": JSONL, ".csv": CSV, ".tsv": TSV, ".tab": TSV, ".parquet": PARQUET, ".pq": PARQUET}
#: formats whose cells are all strings as written (`labels` reads a label column of numbers as class ids)
TEXT_CELLS = (CSV, TSV)
T = TypeVar("T")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the second text of a pair and the label. None: the defaults ("text", or
    "text_a" with an optional "text_b"; "label")."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None

    @property
    def label_name(self) -> str:
        return self.label or "label"


def table_format(path: str | Path, flag: str = "--data") -> str:
    """The format of a data file or directory.

    Raises:
        InputNotFoundError: no such file or directory. UnsupportedError: an unknown suffix, or a directory that
            `datasets` did not write.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise UnsupportedError(
                f"{flag} {path}: a DatasetDict with splits {', '.join(splits)}; pass one split's "
                f"directory, e.g. {path / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return DATASETS
        raise UnsupportedError(
            f"{flag} {path}: a directory that is not a `datasets` save_to_disk directory (no "
            "state.json); pass a .jsonl, .csv, .tsv or .parquet file or such a directory"
        )
    if not path.is_file():
        raise InputNotFoundError(f"{flag} {path}: no such data file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UnsupportedError(
            f"{flag} {path}: unknown data format {path.suffix or '(no suffix)'!r}; use .jsonl, "
            ".csv, .tsv, .parquet or a `datasets` save_to_disk directory"
        )
    return kind


def rows(path: str | Path, flag: str = "--data") -> Iterator[tuple[int, object]]:
    """(line or row number, row) for each example of a data file; JSONL rows are any JSON value (checked by the
    caller), the other formats' rows are dicts of column -> value.

    Raises:
        InputNotFoundError, UnsupportedError (see `table_format`); FormatError: a line that is not JSON, a CSV or TSV
            row with more or fewer cells than the header, a TSV quoted in one place and not in another
            (`delimited`), an unreadable Parquet file.
    """
    kind = table_format(path, flag)
    if kind == JSONL:
        yield from _jsonl(Path(path))
    elif kind in (CSV, TSV):
        yield from delimited.rows(Path(path), "," if kind == CSV else "\t")
    elif kind == PARQUET:
        yield from enumerate(_parquet(Path(path), flag), 1)
    else:
        yield from enumerate(_datasets(Path(path), flag), 1)


def columns(path: str | Path, flag: str = "--data") -> list[str] | None:
    """The column names of a table (None for JSONL, whose rows may differ), without reading its rows."""
    kind = table_format(path, flag)
    if kind in (CSV, TSV):
        return delimited.header(Path(path), "," if kind == CSV else "\t")
    if kind == PARQUET:
        return list(_pyarrow(flag, path).parquet.read_schema(path).names)
    if kind == DATASETS:
        return list(_load_dataset(Path(path), flag).column_names)
    return None


def read(
    path: str | Path, parse: Callable[[int, object], T], flag: str = "--data", columns: Columns | None = None
) -> list[T]:
    """parse(line number, row) for each row (`task_rows`); its TypeError, KeyError or ValueError becomes one
    FormatError naming the file and line (row).

    Raises:
        FormatError: a bad row; no rows.
    """
    out = []
    for lineno, row in task_rows(path, flag, columns):
        try:
            out.append(parse(lineno, row))
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{path}:{lineno}: {e}") from e
    if not out:
        raise FormatError(f"{flag} {path}: no examples (the file is empty)")
    return out


def task_rows(path: str | Path, flag: str, named: Columns | None = None) -> Iterator[tuple[int, object]]:
    """`rows`, without a table's empty (null) cells; for the language-model tasks --text-column names the "text".

    Raises:
        FormatError: a --text-column the table lacks; what `rows` raises.
    """
    text_column = named.text if named is not None else None
    if text_column is not None:
        header = columns(path, flag)
        if header is not None and text_column not in header:
            raise FormatError(
                f"{flag} {path}: no column {text_column!r} (--text-column); its columns are "
                f"{', '.join(map(repr, header))}"
            )
    table = table_format(path, flag) != JSONL
    for lineno, row in rows(path, flag):
        if text_column is not None and isinstance(row, dict) and text_column in row:
            row = {"text": row[text_column]}
        elif table and None in row.values():
            row = {k: v for k, v in row.items() if v is not None}  # a table's empty cells: columns not used here
        yield lineno, row


def text(row: dict, key: str) -> str:
    """The string in `row[key]`; ValueError naming the key otherwise."""
    if not isinstance(row.get(key), str):
        raise ValueError(f'"{key}" must be a string')
    return row[key]


def _jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(f"{path}:{lineno}: not JSON ({e})") from e


def _pyarrow(flag: str, path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"{flag} {path}: reading Parquet needs pyarrow; pip install pyarrow") from e
    return pyarrow


def _parquet(path: Path, flag: str) -> list[dict]:
    pa = _pyarrow(flag, path)
    try:
        return pa.parquet.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{flag} {path}: not a readable Parquet file ({e})") from e


def _load_dataset(path: Path, flag: str):
    try:
        import datasets
    except ImportError as e:
        raise UnsupportedError(
            f"{flag} {path}: a `datasets` directory needs the datasets package; pip install "
            "datasets (or export it to .parquet/.jsonl)"
        ) from e
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise FormatError(f"{flag} {path}: not a readable `datasets` directory ({e})") from e


def _datasets(path: Path, flag: str) -> Iterator[dict]:
    ds = _load_dataset(path, flag)
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise UnsupportedError(f"{flag} {path}: a DatasetDict; pass one split's directory")
    yield from ds  # ClassLabel columns hold their class ids, which stay the ids
