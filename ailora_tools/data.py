"""Training data: JSONL in three shapes, tokenized with loss masks.

- {"text": ...}: loss on every token.
- {"prompt": ..., "completion": ...}: loss on completion tokens only.
- {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template; loss on the
  assistant turns only (each found as the difference between the conversation rendered up to it with a
  generation prompt and rendered through it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import FormatError, InputNotFoundError

if TYPE_CHECKING:
    import torch

IGNORE = -100


@dataclass
class Example:
    """One tokenized example; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def check_rows(path: str | Path, *, flag: str = "--data") -> int:
    """Check a JSONL file's shape without a tokenizer (every line an object of one of the three shapes), so
    bad data fails in a second, before any model loads. Returns the number of rows.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number; no rows.
    """
    n = 0
    for lineno, row in _rows(path, flag):
        _shape(row, path, lineno)
        n += 1
    if not n:
        raise FormatError(f"{flag} {path}: no examples (the file is empty)")
    return n


def load_jsonl(path: str | Path, tokenizer, *, max_length: int, limit: int | None = None) -> list[Example]:
    """Read and tokenize a JSONL file (its first `limit` rows when given); every example must keep at least
    one loss token after `max_length`.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, or one with no token to learn from (an
            empty text, no assistant turn, a prompt as long as --max-length), naming its line number.
    """
    examples = []
    for lineno, row in _rows(path, "--data"):
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


def _rows(path: str | Path, flag: str) -> Iterator[tuple[int, object]]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{flag} {path}: no such data file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(f"{path}:{lineno}: not JSON ({e})") from e


def _shape(row, path, lineno) -> None:
    if not isinstance(row, dict):
        raise FormatError(f"{path}:{lineno}: each line must be a JSON object")
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
