"""Training data: JSONL, CSV, TSV, Parquet or a `datasets` directory (`tables`), tokenized with loss masks
(language models) or labels (classification). Rows below are written as JSON; in the other formats they are
columns of those names (or those `Columns` names).

Causal LM:
- {"text": ...}: loss on every token.
- {"prompt": ..., "completion": ...}: loss on completion tokens only.
- {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template; loss on the
  assistant turns only (each found as the difference between the conversation rendered up to it with a
  generation prompt and rendered through it).

Masked LM: {"text": ...} (other keys, such as an id, are ignored; rows with "label" are refused); 15% of the
non-special tokens are picked (at least one), once, with a seeded draw (static masking, so a resumed run sees
the same data); of those 80% become the mask token, 10% a random token, 10% stay; the loss is on the picked
tokens.

Sequence classification: {"text", "label"} or {"text_a", "text_b", "label"} (a sentence pair, as GLUE's MRPC or
RTE). Labels are class ids (integers 0..K-1) or class names (strings), one type in all files; CSV/TSV labels
that are all integers are class ids. `Columns` renames the text, pair and label columns (--text-column,
--text-pair-column, --label-column). Regression (a head with one output, `regression=True`): labels are numbers.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from ..architectures import CAUSAL_LM, CLASSIFY, MASKED_LM, saved_task
from ..errors import FormatError, TargetError
from . import tables

if TYPE_CHECKING:
    import torch

IGNORE = -100
MASK_PROBABILITY = 0.15
LABELED_SHAPES = '{"text", "label"} or {"text_a", "text_b", "label"}'
T = TypeVar("T")


@dataclass
class Example:
    """One tokenized example; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


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


def check_rows(path: str | Path, *, flag: str = "--data", task: str = CAUSAL_LM, columns: Columns | None = None,
               regression: bool = False) -> int:
    """Check a JSONL file's shape without a tokenizer, so bad data fails in a second, before any model loads:
    every line an object of one of the causal-LM shapes, {"text"} for masked-lm, or a labeled row (one label
    type in the file) for sequence-classification. Returns the number of rows.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number; no rows.
    """
    if task == CLASSIFY:
        return len(read_labeled(path, flag=flag, columns=columns, regression=regression))
    n = 0
    for lineno, row in _rows(path, flag, columns):
        (_masked_shape if task == MASKED_LM else _shape)(row, path, lineno)
        n += 1
    if not n:
        raise FormatError(f"{flag} {path}: no examples (the file is empty)")
    return n


def load_jsonl(path: str | Path, tokenizer, *, max_length: int, limit: int | None = None,
               columns: Columns | None = None) -> list[Example]:
    """Read and tokenize a JSONL file (its first `limit` rows when given); every example must keep at least
    one loss token after `max_length`.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, or one with no token to learn from (an
            empty text, no assistant turn, a prompt as long as --max-length), naming its line number.
    """
    examples = []
    for lineno, row in _rows(path, "--data", columns):
        _shape(row, path, lineno)
        try:
            ex = _example(row, tokenizer)
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{path}:{lineno}: {e}") from e
        kept = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if not any(label != IGNORE for label in kept.labels[1:]):  # the first token is never predicted
            why = (f"its loss tokens start after --max-length {max_length}; raise it or shorten the prompt"
                   if any(label != IGNORE for label in ex.labels[1:]) else _no_loss_reason(row))
            raise FormatError(f"{path}:{lineno}: no token carries loss ({why}); fix or remove the line")
        examples.append(kept)
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise FormatError(f"{path}: no examples")
    return examples


def load_masked_jsonl(path: str | Path, tokenizer, *, max_length: int, seed: int,
                      columns: Columns | None = None) -> list[Example]:
    """Read {"text"} rows (other keys ignored), tokenize them with special tokens and mask them for a masked-LM
    loss (seeded).

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    return _read(path, lambda line, row: _masked(row, tokenizer, gen, max_length), columns=columns)


def read_labeled(path: str | Path, *, flag: str = "--data", columns: Columns | None = None,
                 regression: bool = False) -> list[LabeledRow]:
    """Read and validate sequence-classification rows (no tokenizer needed, so before any model loads).

    Args:
        columns: the text, pair and label column names (default: "text" or "text_a"/"text_b", "label").
        regression: labels are numbers (a head with one output); CSV/TSV cells are parsed as floats.

    Raises:
        InputNotFoundError: no such file. FormatError: a named column the table lacks (listing its columns); a
            bad line (no label, a label of another type than the rows before it, no text), naming its line.
    """
    columns = columns or Columns()
    kind = tables.table_format(path, flag)
    header = tables.columns(path, flag)
    if header is not None:
        for option, name in (("--text-column", columns.text), ("--text-pair-column", columns.pair),
                             ("--label-column", columns.label_name)):
            if name is not None and name not in header:
                raise FormatError(f"{flag} {path}: no column {name!r} ({option}"
                                  f"{'' if option != '--label-column' or columns.label else ' default'}); its "
                                  f"columns are {', '.join(map(repr, header))}")
        if columns.text is None and "text" not in header and "text_a" not in header:
            raise FormatError(f"{flag} {path}: no \"text\" or \"text_a\" column; name the text column with "
                              f"--text-column (its columns are {', '.join(map(repr, header))})")
    first: list[LabeledRow] = []  # the first row, whose label type every other row must have
    label_key = columns.label_name

    def parse(line: int, row) -> LabeledRow:
        if not isinstance(row, dict):
            raise ValueError("each line must be a JSON object")
        if label_key not in row or row[label_key] is None:
            raise ValueError(f'no {json.dumps(label_key)} column; sequence-classification rows are '
                             + (LABELED_SHAPES if columns == Columns() else "text and label columns")
                             + ("" if label_key not in row else " (this row's label is empty)"))
        label = _label(row[label_key], label_key, regression, text_cells=kind in tables.TEXT_CELLS)
        if first and type(label) is not type(first[0].label):
            raise ValueError(f'{json.dumps(label_key)} is {_kind(label)} here but {_kind(first[0].label)} on line '
                             f"{first[0].line}; use one type for every label")
        if columns.text is not None:
            pair = _str(row, columns.pair) if columns.pair is not None else None
            parsed = LabeledRow(line, _str(row, columns.text), pair, label)
        elif "text" in row:
            parsed = LabeledRow(line, _str(row, "text"), _str(row, columns.pair) if columns.pair else None, label)
        elif "text_a" in row:
            pair = columns.pair or "text_b"
            parsed = LabeledRow(line, _str(row, "text_a"), _str(row, pair) if pair in row else None, label)
        else:
            raise ValueError(f'no "text" or "text_a" column; sequence-classification rows are {LABELED_SHAPES} '
                             "(or name the columns with --text-column, --text-pair-column, --label-column)")
        first[:] = first or [parsed]
        return parsed

    out = _read(path, parse, flag)
    if kind in tables.TEXT_CELLS and not regression and all(_INT.fullmatch(r.label) for r in out):
        for r in out:  # "0", "1" in a CSV/TSV are class ids, as in GLUE's files
            r.label = int(r.label)
            if r.label < 0:
                raise FormatError(f"{path}:{r.line}: {json.dumps(label_key)} is {r.label}; class ids are 0..K-1")
    return out


_INT = re.compile(r"-?\d+")


def _label(value, key: str, regression: bool, *, text_cells: bool) -> int | str | float:
    """A row's label as read: a number for regression, else a class id (int) or a class name (str)."""
    name = json.dumps(key)
    if regression:
        if isinstance(value, str) and text_cells:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} is {json.dumps(value)}; regression (--num-labels 1) needs numbers") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} is {json.dumps(value)}; regression (--num-labels 1) needs finite numbers")
        return float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet/pandas may store class ids as floats
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} is {json.dumps(value)}; labels are class ids (integers 0..K-1) or class names "
                         "(strings); for a regression target pass --num-labels 1")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} is {value}; class ids are 0..K-1")
    return value


def _kind(label) -> str:
    return "a string" if isinstance(label, str) else "a number" if isinstance(label, float) else "an integer"


def label_ids(rows: list[LabeledRow], eval_rows: list[LabeledRow], *, data, eval_data, config: dict, base,
              num_labels: int | None) -> tuple[dict | None, dict]:
    """label -> class id (None: regression), and the head's config keys (num_labels, id2label, label2id,
    problem_type), for a model of `config` (a head it already has fixes them) and --num-labels. Ids are the
    integers as written, or names in sorted order.

    Raises:
        FormatError: labels of mixed types, or more than the head has. TargetError: --num-labels against the head.
    """
    every = [(data, r) for r in rows] + [(eval_data, r) for r in eval_rows]
    first = rows[0]
    for path, r in every:
        if type(r.label) is not type(first.label):
            raise FormatError(f"{path}:{r.line}: \"label\" is {_kind(r.label)} but {_kind(first.label)} in {data}:"
                              f"{first.line}; use one type for every label")
    head = _head_labels(config)
    if num_labels is not None and head is not None and num_labels != len(head):
        raise TargetError(f"--num-labels {num_labels}: the base {base} already has a classification head with "
                          f"{len(head)} labels; leave --num-labels out")
    if num_labels == 1 or (head is not None and len(head) == 1):  # regression (STS-B): one output, float labels
        if not isinstance(first.label, float):
            raise FormatError(f"{data}:{first.line}: label {first.label!r}; a regression head (--num-labels 1) "
                              "needs numbers")
        return None, {"num_labels": 1, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0},
                      "problem_type": "regression"}
    size = len(head) if head is not None else num_labels
    whose = f"the classification head of {base}" if head is not None else f"--num-labels {num_labels}"
    if isinstance(first.label, int):
        path, top = max(every, key=lambda pr: pr[1].label)
        if size is not None and top.label >= size:
            raise FormatError(f"{path}:{top.line}: label {top.label}, but {whose} has {size} labels (ids 0..{size - 1})"
                              "; give fewer labels" + ("" if head is not None else " or raise --num-labels"))
        size = size or max(2, top.label + 1)
        names = head or [f"LABEL_{i}" for i in range(size)]
        ids = {i: i for i in range(size)}
    else:
        found = sorted({r.label for _, r in every})
        if head is not None:
            ids = {name: i for i, name in enumerate(head)}
            unknown = [name for name in found if name not in ids]
            if unknown:
                raise FormatError(f"{data}: labels {unknown[:3]} are not among the {len(head)} labels of {whose} "
                                  f"({', '.join(head[:5])}); use those names or the class ids 0..{len(head) - 1}")
            names = head
        else:
            if size is not None and len(found) > size:
                raise FormatError(f"{data}: {len(found)} label names ({', '.join(found[:5])}), but {whose} has {size} "
                                  "labels; raise --num-labels")
            size = size or max(2, len(found))
            names = found + [f"LABEL_{i}" for i in range(len(found), size)]
            ids = {name: i for i, name in enumerate(found)}
    return ids, {"num_labels": size, "id2label": dict(enumerate(names)),
                 "label2id": {name: i for i, name in enumerate(names)}, "problem_type": "single_label_classification"}


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
        out.append(LabeledExample(enc["input_ids"], enc.get("token_type_ids"), r.label if ids is None else ids[r.label]))
    return out


def _read(path: str | Path, parse: Callable[[int, object], T], flag: str = "--data",
          columns: Columns | None = None) -> list[T]:
    """parse(line number, row) for each row; errors become one line naming the file and line (row)."""
    out = []
    for lineno, row in _rows(path, flag, columns):
        try:
            out.append(parse(lineno, row))
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{path}:{lineno}: {e}") from e
    if not out:
        raise FormatError(f"{flag} {path}: no examples (the file is empty)")
    return out


def _rows(path: str | Path, flag: str, columns: Columns | None = None) -> Iterator[tuple[int, object]]:
    """The rows of any data format (`tables`); for the language-model tasks --text-column names the "text"."""
    text = columns.text if columns is not None else None
    if text is not None:
        header = tables.columns(path, flag)
        if header is not None and text not in header:
            raise FormatError(f"{flag} {path}: no column {text!r} (--text-column); its columns are "
                              f"{', '.join(map(repr, header))}")
    table = tables.table_format(path, flag) != tables.JSONL
    for lineno, row in tables.rows(path, flag):
        if text is not None and isinstance(row, dict) and text in row:
            row = {"text": row[text]}
        elif table and None in row.values():
            row = {k: v for k, v in row.items() if v is not None}  # a table's empty cells: columns not used here
        yield lineno, row


def _shape(row, path, lineno) -> None:
    if not isinstance(row, dict):
        raise FormatError(f"{path}:{lineno}: each line must be a JSON object")
    if "label" in row:
        raise FormatError(f'{path}:{lineno}: rows with "label" are for --task sequence-classification')
    keys = [k for k in ("text", "prompt", "completion") if k in row]
    if "messages" not in row and not keys or ("prompt" in row) != ("completion" in row) and "text" not in row:
        raise FormatError(f'{path}:{lineno}: expected "text", "prompt" + "completion", or "messages"')
    for k in keys:
        if not isinstance(row[k], str):
            raise FormatError(f'{path}:{lineno}: "{k}" must be a string')
    if "messages" in row and not keys:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise FormatError(f'{path}:{lineno}: "messages" must be a list of {{"role", "content"}} objects')


def _masked_shape(row, path, lineno) -> None:
    try:
        _masked_row(row)
    except ValueError as e:
        raise FormatError(f"{path}:{lineno}: {e}") from e


def _masked_row(row) -> str:
    """The text of a masked-LM row (other keys are ignored); ValueError for a row without "text" or with "label"."""
    if not isinstance(row, dict) or "text" not in row or "label" in row:
        raise ValueError('masked-LM rows are {"text"}' + (' (rows with "label" are for --task sequence-classification)'
                                                          if isinstance(row, dict) and "label" in row else ""))
    return _str(row, "text")


def _str(row: dict, key: str) -> str:
    if not isinstance(row.get(key), str):
        raise ValueError(f'"{key}" must be a string')
    return row[key]


def _no_loss_reason(row: dict) -> str:
    if "messages" in row:
        return "no assistant turn"
    if "text" in row:
        return "empty text"
    return "empty completion"


def _example(row: dict, tok) -> Example:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "text" in row:
        ids = _encode(tok, row["text"]) + eos
        return Example(ids, list(ids))
    if "prompt" in row or "completion" in row:
        p, c = _encode(tok, row.get("prompt", "")), _encode(tok, row.get("completion", "")) + eos
        return Example(p + c, [IGNORE] * len(p) + c)
    return _chat(row["messages"], tok)


def _masked(row, tok, gen: "torch.Generator", max_length: int) -> Example:
    import torch

    ids = tok(_masked_row(row), truncation=True, max_length=max_length)["input_ids"]
    special = tok.get_special_tokens_mask(ids, already_has_special_tokens=True)
    candidates = [i for i, s in enumerate(special) if not s]
    if not candidates:
        raise ValueError('"text" has no token to mask')
    draw = torch.rand(len(ids), generator=gen)
    picked = [i for i in candidates if draw[i] < MASK_PROBABILITY]
    picked = picked or [candidates[int(torch.randint(len(candidates), (1,), generator=gen))]]
    inputs, labels = list(ids), [IGNORE] * len(ids)
    for i in picked:
        labels[i], how = ids[i], float(torch.rand(1, generator=gen))
        if how < 0.8:
            inputs[i] = tok.mask_token_id
        elif how < 0.9:
            inputs[i] = int(torch.randint(len(tok), (1,), generator=gen))
    return Example(inputs, labels)


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat(messages: list[dict], tok) -> Example:
    if not getattr(tok, "chat_template", None):
        raise ValueError('"messages" needs a tokenizer with a chat template; use "prompt"/"completion" instead')
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    ids = _encode(tok, render(messages, False))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(_encode(tok, render(messages[:i], True)))
            end = len(_encode(tok, render(messages[: i + 1], False)))
            labels[start:end] = ids[start:end]
    return Example(ids, labels)


def collate(batch: list[Example], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad a batch; padding gets attention 0 and no loss."""
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_labeled(batch: list[LabeledExample], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad a classification batch; labels are one class id per example."""
    import torch

    out = collate([Example(e.input_ids, e.input_ids) for e in batch], pad_id)
    regression = isinstance(batch[0].label, float)  # one output: float targets (MSE loss)
    out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.float32 if regression else torch.long)
    if batch[0].token_type_ids is not None:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        for i, e in enumerate(batch):
            out["token_type_ids"][i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
    return out
