"""Training data: JSONL, tokenized with loss masks (language models) or labels (classification).

Causal LM:
- {"text": ...}: loss on every token.
- {"prompt": ..., "completion": ...}: loss on completion tokens only.
- {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template; loss on the
  assistant turns only (each found as the difference between the conversation rendered up to it with a
  generation prompt and rendered through it).

Masked LM: {"text": ...}; 15% of the non-special tokens are picked (at least one), once, with a seeded draw
(static masking, so a resumed run sees the same data); of those 80% become the mask token, 10% a random token,
10% stay; the loss is on the picked tokens.

Sequence classification: {"text", "label"} or {"text_a", "text_b", "label"} (a sentence pair, as GLUE's MRPC or
RTE). Labels are class ids (integers 0..K-1) or class names (strings), one type in all files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .errors import FormatError, InputNotFoundError

IGNORE = -100
MASK_PROBABILITY = 0.15
LABELED_SHAPES = '{"text", "label"} or {"text_a", "text_b", "label"}'
T = TypeVar("T")


@dataclass
class Example:
    """One tokenized example; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class LabeledRow:
    """One sequence-classification row as written: its line number, text or text pair, and label."""

    line: int
    text_a: str
    text_b: str | None
    label: int | str


@dataclass
class LabeledExample:
    """One tokenized sequence-classification example."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int


def load_jsonl(path: str | Path, tokenizer, *, max_length: int) -> list[Example]:
    """Read and tokenize a causal-LM JSONL file.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number.
    """
    examples = _read(path, lambda line, row: _example(row, tokenizer))
    return [Example(ex.input_ids[:max_length], ex.labels[:max_length]) for ex in examples]


def load_masked_jsonl(path: str | Path, tokenizer, *, max_length: int, seed: int) -> list[Example]:
    """Read {"text"} rows, tokenize them with special tokens and mask them for a masked-LM loss (seeded).

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number.
    """
    gen = torch.Generator().manual_seed(seed)
    return _read(path, lambda line, row: _masked(row, tokenizer, gen, max_length))


def read_labeled_jsonl(path: str | Path) -> list[LabeledRow]:
    """Read and validate sequence-classification rows (no tokenizer needed, so before any model loads).

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line (no "label" column, a label of another type
            than the rows before it, no text), naming its line number.
    """
    first: list[LabeledRow] = []  # the first row, whose label type every other row must have

    def parse(line: int, row) -> LabeledRow:
        if not isinstance(row, dict):
            raise ValueError("each line must be a JSON object")
        if "label" not in row:
            raise ValueError(f'no "label" column; sequence-classification rows are {LABELED_SHAPES}')
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f'"label" is {json.dumps(label)}; labels are class ids (integers 0..K-1) or class names '
                             "(strings)")
        if isinstance(label, int) and label < 0:
            raise ValueError(f'"label" is {label}; class ids are 0..K-1')
        if first and type(label) is not type(first[0].label):
            raise ValueError(f'"label" is {_kind(label)} here but {_kind(first[0].label)} on line {first[0].line}; '
                             "use one type for every label")
        if "text" in row:
            parsed = LabeledRow(line, _str(row, "text"), None, label)
        elif "text_a" in row:
            parsed = LabeledRow(line, _str(row, "text_a"), _str(row, "text_b") if "text_b" in row else None, label)
        else:
            raise ValueError(f'no "text" or "text_a" column; sequence-classification rows are {LABELED_SHAPES}')
        first[:] = first or [parsed]
        return parsed

    return _read(path, parse)


def _kind(label) -> str:
    return "a string" if isinstance(label, str) else "an integer"


def tokenize_labeled(rows: list[LabeledRow], tokenizer, ids: dict, *, max_length: int) -> list[LabeledExample]:
    """Tokenize rows with the tokenizer's special tokens (text pairs as pairs); `ids` maps each label to its id."""
    out = []
    for r in rows:
        enc = tokenizer(r.text_a, r.text_b, truncation=True, max_length=max_length)
        out.append(LabeledExample(enc["input_ids"], enc.get("token_type_ids"), ids[r.label]))
    return out


def _read(path: str | Path, parse: Callable[[int, object], T]) -> list[T]:
    """parse(line number, JSON value) for each non-blank line; errors become one line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such data file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(lineno, json.loads(line)))
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
                raise FormatError(f"{path}:{lineno}: {e}") from e
    if not out:
        raise FormatError(f"{path}: no examples")
    return out


def _example(row, tok) -> Example:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "label" in row:
        raise ValueError('rows with "label" are for --task sequence-classification')
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "text" in row:
        ids = _encode(tok, _str(row, "text")) + eos
        return Example(ids, list(ids))
    if "prompt" in row or "completion" in row:
        p, c = _encode(tok, _str(row, "prompt")), _encode(tok, _str(row, "completion")) + eos
        return Example(p + c, [IGNORE] * len(p) + c)
    if "messages" in row:
        return _chat(row["messages"], tok)
    raise ValueError('expected "text", "prompt" + "completion", or "messages"')


def _str(row: dict, key: str) -> str:
    if not isinstance(row.get(key), str):
        raise ValueError(f'"{key}" must be a string')
    return row[key]


def _masked(row, tok, gen: torch.Generator, max_length: int) -> Example:
    if not isinstance(row, dict) or set(row) != {"text"}:
        raise ValueError('masked-LM rows are {"text"} only' + (' (rows with "label" are for --task '
                         'sequence-classification)' if isinstance(row, dict) and "label" in row else ""))
    ids = tok(_str(row, "text"), truncation=True, max_length=max_length)["input_ids"]
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


def _chat(messages, tok) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError('"messages" must be a list of {"role", "content"} objects')
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


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and no loss."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_labeled(batch: list[LabeledExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a classification batch; labels are one class id per example."""
    out = collate([Example(e.input_ids, e.input_ids) for e in batch], pad_id)
    out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.long)
    if batch[0].token_type_ids is not None:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        for i, e in enumerate(batch):
            out["token_type_ids"][i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
    return out
