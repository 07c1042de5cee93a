"""Sequence-classification rows and their labels, in every data format (`tables`), and the class ids they get.

A label is a class id or a class name, one type in all files, and every row has one (an empty CSV/TSV cell, a
JSON null or a missing key, a Parquet null is refused with the file and line):
- Class ids are integer-valued numbers 0..K-1: JSON, Parquet and `datasets` integers, and floats such as 1.0
  (Parquet and pandas often store ids so); in CSV/TSV, a label column whose every cell is a number ("1", "1.0",
  "1e0" are the id 1). A number that is not an integer (1.5) is refused: a regression takes --num-labels 1.
  Without a head on the base, every id below the largest must have a row in --data (no gaps).
- Class names are strings (in CSV/TSV, a column in which no cell is a number; a column mixing numbers and words
  is refused), numbered in sorted order.
- --eval-data may hold only labels --data has (a class only the evaluation has would never train), unless the
  base's classification head already has them.
- Regression (--num-labels 1): every label is a finite number.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..architectures import CLASSIFY, saved_task
from ..errors import FormatError, TargetError
from . import tables
from .tables import Columns

LABELED_SHAPES = '{"text", "label"} or {"text_a", "text_b", "label"}'
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_REGRESSION = "use --num-labels 1 for regression"


@dataclass
class LabeledRow:
    """One sequence-classification row as written: its line (row) number, text or text pair, and label."""

    line: int
    text_a: str
    text_b: str | None
    label: int | str | float


@dataclass
class LabeledExample:
    """One tokenized sequence-classification example."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float


def read_labeled(
    path: str | Path, *, flag: str = "--data", columns: Columns | None = None, regression: bool = False
) -> list[LabeledRow]:
    """Read and validate sequence-classification rows (no tokenizer needed, so before any model loads), their
    labels read by the rules of the module docstring.

    Args:
        columns: the text, pair and label column names (default: "text" or "text_a"/"text_b", "label").
        regression: labels are numbers (a head with one output); CSV/TSV cells are parsed as floats.

    Raises:
        InputNotFoundError: no such file. FormatError: a named column the table lacks (listing its columns); a
            bad line (no label or an empty one, a label of another type than the rows before it, a number that is
            not a class id, no text), naming its line.

    Example:
        >>> [r.label for r in read_labeled("train.csv")]  # doctest: +SKIP
        [1, 0, 1]
    """
    columns = columns or Columns()
    text_cells = tables.table_format(path, flag) in tables.TEXT_CELLS
    header = tables.columns(path, flag)
    if header is not None:
        _check_header(path, flag, columns, header)
    first: list[LabeledRow] = []  # the first row, whose label type every other row must have

    def parse(line: int, row) -> LabeledRow:
        label = _label(row, columns, regression, text_cells=text_cells, table=header is not None)
        if first and type(label) is not type(first[0].label):
            raise ValueError(
                f"{json.dumps(columns.label_name)} is {_kind(label)} here but {_kind(first[0].label)} "
                f"on line {first[0].line}; use one type for every label"
            )
        parsed = LabeledRow(line, *_texts(row, columns), label)
        first[:] = first or [parsed]
        return parsed

    out = tables.read(path, parse, flag)
    if text_cells and not regression:
        _cells_to_labels(out, path, columns.label_name)
    return out


def _check_header(path, flag: str, columns: Columns, header: list[str]) -> None:
    for option, name in (
        ("--text-column", columns.text),
        ("--text-pair-column", columns.pair),
        ("--label-column", columns.label_name),
    ):
        if name is not None and name not in header:
            raise FormatError(
                f"{flag} {path}: no column {name!r} ({option}"
                f"{'' if option != '--label-column' or columns.label else ' default'}); its "
                f"columns are {', '.join(map(repr, header))}"
            )
    if columns.text is None and "text" not in header and "text_a" not in header:
        raise FormatError(
            f'{flag} {path}: no "text" or "text_a" column; name the text column with '
            f"--text-column (its columns are {', '.join(map(repr, header))})"
        )


def _texts(row: dict, columns: Columns) -> tuple[str, str | None]:
    """A row's text and the second text of its pair (None without one)."""
    if columns.text is not None:
        return tables.text(row, columns.text), tables.text(row, columns.pair) if columns.pair is not None else None
    if "text" in row:
        return tables.text(row, "text"), tables.text(row, columns.pair) if columns.pair else None
    if "text_a" in row:
        pair = columns.pair or "text_b"
        return tables.text(row, "text_a"), tables.text(row, pair) if pair in row else None
    raise ValueError(
        f'no "text" or "text_a" column; sequence-classification rows are {LABELED_SHAPES} '
        "(or name the columns with --text-column, --text-pair-column, --label-column)"
    )


def _label(row, columns: Columns, regression: bool, *, text_cells: bool, table: bool) -> int | str | float:
    """A row's label as read: a number for regression, else a class id (int) or a class name (str); a CSV/TSV
    cell stays a string until `_cells_to_labels` has seen the whole column."""
    key = columns.label_name
    name = json.dumps(key)
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    value = row.get(key)
    if key not in row and not table:
        raise ValueError(
            f"no {name} column; sequence-classification rows are "
            + (LABELED_SHAPES if columns == Columns() else "text and label columns")
        )
    if value is None or isinstance(value, str) and not value.strip():
        raise ValueError(f"{name} is empty; every row needs a label: fill it in or remove the row")
    if regression:
        if isinstance(value, str) and text_cells:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} is {json.dumps(value)}; regression (--num-labels 1) needs numbers") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} is {json.dumps(value)}; regression (--num-labels 1) needs finite numbers")
        return float(value)
    return value if isinstance(value, str) else _class_id(value, name)


def _class_id(value, name: str) -> int:
    """An integer-valued number as a class id; ValueError for anything else."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet/pandas may store class ids as floats
    if isinstance(value, float):
        raise ValueError(f"{name} is {json.dumps(value)}, not a class id (an integer 0..K-1); {_REGRESSION}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{name} is {json.dumps(value, default=repr)}; labels are class ids (integers 0..K-1) or "
            f"class names (strings); {_REGRESSION}"
        )
    if value < 0:
        raise ValueError(f"{name} is {value}; class ids are 0..K-1")
    return value


def _cells_to_labels(rows: list[LabeledRow], path, key: str) -> None:
    """CSV/TSV label cells as class ids when every one is a number, else as class names; a mix is refused."""
    numbers = [_number(r.label) for r in rows]
    number = next((r for r, x in zip(rows, numbers) if x is not None), None)
    word = next((r for r, x in zip(rows, numbers) if x is None), None)
    if number is not None and word is not None:
        kinds = {id(number): f"a number ({number.label.strip()})", id(word): f"a name ({json.dumps(word.label)})"}
        there, here = sorted((number, word), key=lambda r: r.line)
        raise FormatError(
            f"{path}:{here.line}: {json.dumps(key)} is {kinds[id(here)]} here but {kinds[id(there)]} on "
            f"line {there.line}; use one type for every label"
        )
    for r, x in zip(rows, numbers):
        if x is not None:
            try:
                r.label = _class_id(x, json.dumps(key))
            except ValueError as e:
                raise FormatError(f"{path}:{r.line}: {e}") from e


def _number(cell: str) -> int | float | None:
    cell = cell.strip()
    if not _NUMBER.fullmatch(cell):
        return None
    return int(cell) if cell.lstrip("+-").isdigit() else float(cell)


def _kind(label) -> str:
    return "a string" if isinstance(label, str) else "a number" if isinstance(label, float) else "an integer"


def label_ids(
    rows: list[LabeledRow], eval_rows: list[LabeledRow], *, data, eval_data, config: dict, base, num_labels: int | None
) -> tuple[dict | None, dict]:
    """label -> class id (None: regression), and the head's config keys (num_labels, id2label, label2id,
    problem_type), for a model of `config` (a head it already has fixes them) and --num-labels. Ids are the
    integers as written, or names in sorted order.

    Raises:
        FormatError: labels of mixed types; a gap in the class ids; a label only --eval-data has; more labels than
            the head has. TargetError: --num-labels against the head.

    Example:
        >>> ids, head = label_ids(rows, [], data="t.csv", eval_data=None, config={}, base="m", num_labels=None)
        ... # doctest: +SKIP
    """
    every = [(data, r) for r in rows] + [(eval_data, r) for r in eval_rows]
    first = rows[0]
    for path, r in every:
        if type(r.label) is not type(first.label):
            raise FormatError(
                f'{path}:{r.line}: "label" is {_kind(r.label)} but {_kind(first.label)} in {data}:'
                f"{first.line}; use one type for every label"
            )
    head = _head_labels(config)
    if num_labels is not None and head is not None and num_labels != len(head):
        raise TargetError(
            f"--num-labels {num_labels}: the base {base} already has a classification head with "
            f"{len(head)} labels; leave --num-labels out"
        )
    if num_labels == 1 or (head is not None and len(head) == 1):  # regression (STS-B): one output, float labels
        return None, _regression_head(first, data)
    if head is None:
        _check_eval_labels(rows, eval_rows, data=data, eval_data=eval_data)
    size = len(head) if head is not None else num_labels
    whose = f"the classification head of {base}" if head is not None else f"--num-labels {num_labels}"
    if isinstance(first.label, int):
        ids, names = _integer_labels(every, rows, head, size, whose=whose, data=data)
    else:
        ids, names = _named_labels(every, head, size, whose=whose, data=data)
    return ids, {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "single_label_classification",
    }


def _regression_head(first: LabeledRow, data) -> dict:
    """The head's config keys for a regression (one output); its labels must be numbers."""
    if not isinstance(first.label, float):
        raise FormatError(
            f"{data}:{first.line}: label {first.label!r}; a regression head (--num-labels 1) needs numbers"
        )
    return {"num_labels": 1, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}, "problem_type": "regression"}


def _integer_labels(
    every: list, rows: list[LabeledRow], head: list[str] | None, size: int | None, *, whose: str, data
) -> tuple[dict, list[str]]:
    """Class ids as written: (id -> id, the head's label names), checked against the head's size."""
    path, top = max(every, key=lambda pr: pr[1].label)
    if size is not None and top.label >= size:
        raise FormatError(
            f"{path}:{top.line}: label {top.label}, but {whose} has {size} labels (ids 0..{size - 1})"
            "; give fewer labels" + ("" if head is not None else " or raise --num-labels")
        )
    if head is None:
        _check_no_gap(rows, data)
    size = size or max(2, top.label + 1)
    return {i: i for i in range(size)}, head or [f"LABEL_{i}" for i in range(size)]


def _named_labels(every: list, head: list[str] | None, size: int | None, *, whose: str, data) -> tuple[dict, list[str]]:
    """Label names: the head's ids for its names, or the names in sorted order; (name -> id, the head's names)."""
    found = sorted({r.label for _, r in every})
    if head is not None:
        ids = {name: i for i, name in enumerate(head)}
        unknown = [name for name in found if name not in ids]
        if unknown:
            raise FormatError(
                f"{data}: labels {unknown[:3]} are not among the {len(head)} labels of {whose} "
                f"({', '.join(head[:5])}); use those names or the class ids 0..{len(head) - 1}"
            )
        return ids, head
    if size is not None and len(found) > size:
        raise FormatError(
            f"{data}: {len(found)} label names ({', '.join(found[:5])}), but {whose} has {size} "
            "labels; raise --num-labels"
        )
    size = size or max(2, len(found))
    return {name: i for i, name in enumerate(found)}, found + [f"LABEL_{i}" for i in range(len(found), size)]


def _check_eval_labels(rows: list[LabeledRow], eval_rows: list[LabeledRow], *, data, eval_data) -> None:
    """No label only --eval-data has (a new head's class without training rows)."""
    present = {r.label for r in rows}
    for r in eval_rows:
        if r.label not in present:
            raise FormatError(
                f"--eval-data {eval_data}:{r.line}: label {r.label!r} is in no row of --data {data}; "
                "a class only the evaluation has never trains: add rows of it to --data or leave it "
                "out of --eval-data"
            )


def _check_no_gap(rows: list[LabeledRow], data) -> None:
    """Every class id below the largest has rows in --data (a new head's class without training rows)."""
    present = {r.label for r in rows}
    gap = next((i for i in range(max(present)) if i not in present), None)
    if gap is not None:
        shown = ", ".join(map(str, sorted(present)[:8])) + (", ..." if len(present) > 8 else "")
        raise FormatError(
            f"{data}: no row has class id {gap} (the ids are {shown}); class ids are 0..K-1, each "
            "with rows: number the classes without gaps, or give them as names"
        )


def _head_labels(config: dict) -> list[str] | None:
    """The label names of the classification head a checkpoint already has, or None."""
    if saved_task(config) != CLASSIFY:
        return None
    id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    return [id2label[k] for k in sorted(id2label, key=int)]


def tokenize_labeled(rows: list[LabeledRow], tokenizer, ids: dict | None, *, max_length: int) -> list[LabeledExample]:
    """Tokenize rows with the tokenizer's special tokens (text pairs as pairs); `ids` maps each label to its id
    (None: regression, the label is the target)."""
    out = []
    for r in rows:
        enc = tokenizer(r.text_a, r.text_b, truncation=True, max_length=max_length)
        label = r.label if ids is None else ids[r.label]
        out.append(LabeledExample(enc["input_ids"], enc.get("token_type_ids"), label))
    return out
