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

import torch

from .errors import FormatError, InputNotFoundError

IGNORE = -100


@dataclass
class Example:
    """One tokenized example; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def load_jsonl(path: str | Path, tokenizer, *, max_length: int) -> list[Example]:
    """Read and tokenize a JSONL file.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such data file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = _example(row, tokenizer)
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
                raise FormatError(f"{path}:{lineno}: {e}") from e
            examples.append(Example(ex.input_ids[:max_length], ex.labels[:max_length]))
    if not examples:
        raise FormatError(f"{path}: no examples")
    return examples


def _example(row, tok) -> Example:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
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
