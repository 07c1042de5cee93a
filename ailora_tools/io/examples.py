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
RTE), read by `labels` (its docstring says what a label is in each format). `Columns` renames the text, pair and
label columns (--text-column, --text-pair-column, --label-column). Regression (a head with one output,
`regression=True`): labels are numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import CAUSAL_LM, CLASSIFY, MASKED_LM
from ..errors import FormatError
from . import tables
from .labels import LabeledExample, label_ids, read_labeled
from .tables import Columns

if TYPE_CHECKING:
    import torch

IGNORE = -100
MASK_PROBABILITY = 0.15


@dataclass
class Example:
    """One tokenized example; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def check_rows(
    path: str | Path,
    *,
    flag: str = "--data",
    task: str = CAUSAL_LM,
    columns: Columns | None = None,
    regression: bool = False,
) -> int:
    """Check a JSONL file's shape without a tokenizer, so bad data fails in a second, before any model loads:
    every line an object of one of the causal-LM shapes, {"text"} for masked-lm, or a labeled row (one label
    type in the file) for sequence-classification. Returns the number of rows.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number; no rows.
    """
    if task == CLASSIFY:
        return len(read_labeled(path, flag=flag, columns=columns, regression=regression))
    n = 0
    for lineno, row in tables.task_rows(path, flag, columns):
        (_masked_shape if task == MASKED_LM else _shape)(row, path, lineno)
        n += 1
    if not n:
        raise FormatError(f"{flag} {path}: no examples (the file is empty)")
    return n


def check_data(
    task: str,
    data: str | Path,
    eval_data: str | Path | None = None,
    *,
    columns: Columns | None = None,
    num_labels: int | None = None,
    config: dict,
    base,
) -> dict[str, int]:
    """Check train's --data and --eval-data for `task` before any model loads (train and compare call it): every
    row's shape (`check_rows`) and, for sequence classification, the labels of both files together (`label_ids`:
    one type, no gap in the class ids, no label only --eval-data has, no more labels than the head has).

    Args:
        config: the base model's config (a classification head it has fixes the labels). base: its path, for
            messages. num_labels: --num-labels (1: regression).

    Returns:
        The rows of each file given: {"--data": n, "--eval-data": m}.

    Raises:
        InputNotFoundError, UnsupportedError: no such file, an unknown format. FormatError: a bad row, naming the
            file and line; labels the two files do not share. TargetError: --num-labels against the head.

    Example:
        >>> check_data("sequence-classification", "train.csv", "dev.csv", config={}, base="m")  # doctest: +SKIP
        {'--data': 6920, '--eval-data': 872}
    """
    files = {"--data": data, **({"--eval-data": eval_data} if eval_data is not None else {})}
    if task != CLASSIFY:
        return {flag: check_rows(path, flag=flag, task=task, columns=columns) for flag, path in files.items()}
    read = {
        flag: read_labeled(path, flag=flag, columns=columns, regression=num_labels == 1) for flag, path in files.items()
    }
    label_ids(
        read["--data"],
        read.get("--eval-data", []),
        data=data,
        eval_data=eval_data,
        config=config,
        base=base,
        num_labels=num_labels,
    )
    return {flag: len(rows) for flag, rows in read.items()}


def load_jsonl(
    path: str | Path, tokenizer, *, max_length: int, limit: int | None = None, columns: Columns | None = None
) -> list[Example]:
    """Read and tokenize a JSONL file (its first `limit` rows when given); every example must keep at least
    one loss token after `max_length`.

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, or one with no token to learn from (an
            empty text, no assistant turn, a prompt as long as --max-length), naming its line number.
    """
    examples = []
    for lineno, row in tables.task_rows(path, "--data", columns):
        _shape(row, path, lineno)
        try:
            ex = _example(row, tokenizer)
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{path}:{lineno}: {e}") from e
        kept = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if not any(label != IGNORE for label in kept.labels[1:]):  # the first token is never predicted
            why = (
                f"its loss tokens start after --max-length {max_length}; raise it or shorten the prompt"
                if any(label != IGNORE for label in ex.labels[1:])
                else _no_loss_reason(row)
            )
            raise FormatError(f"{path}:{lineno}: no token carries loss ({why}); fix or remove the line")
        examples.append(kept)
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise FormatError(f"{path}: no examples")
    return examples


def load_masked_jsonl(
    path: str | Path, tokenizer, *, max_length: int, seed: int, columns: Columns | None = None
) -> list[Example]:
    """Read {"text"} rows (other keys ignored), tokenize them with special tokens and mask them for a masked-LM
    loss (seeded).

    Raises:
        InputNotFoundError: no such file. FormatError: a bad line, naming its line number.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tables.read(path, lambda line, row: _masked(row, tokenizer, gen, max_length), columns=columns)


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
        raise ValueError(
            'masked-LM rows are {"text"}'
            + (
                ' (rows with "label" are for --task sequence-classification)'
                if isinstance(row, dict) and "label" in row
                else ""
            )
        )
    return tables.text(row, "text")


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


def _masked(row, tok, gen: torch.Generator, max_length: int) -> Example:
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


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
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


def collate_labeled(batch: list[LabeledExample], pad_id: int) -> dict[str, torch.Tensor]:
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
