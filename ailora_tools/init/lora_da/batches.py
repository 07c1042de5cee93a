"""Calibration samples as right-padded micro-batches on the compute device, with the positions whose outputs enter
the loss and the tokens the statistics average over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...architectures import CAUSAL_LM, CLASSIFY
from ...errors import FormatError
from ...io.examples import IGNORE, Example
from ...io.labels import LabeledExample

if TYPE_CHECKING:
    from .parts import ModelParts


@dataclass
class Batch:
    """One right-padded micro-batch on the compute device."""

    ids: torch.Tensor  # [B, T] long
    attention: torch.Tensor  # [B, T] long, 1 on real tokens
    positions: torch.Tensor  # [B, T] long
    types: torch.Tensor  # [B, T] long: token types (encoders; zeros without a pair)
    real: torch.Tensor  # [B, T] bool: tokens G sums over
    factor: torch.Tensor  # [B, T] bool: tokens Z and E[g²] average over
    rows: torch.Tensor  # [K] sample index of each loss position
    cols: torch.Tensor  # [K] position whose output enters the loss
    labels: torch.Tensor  # [K] the target there: the next token, the masked token, the class id (float: regression)
    weights: torch.Tensor  # [K] float32, 1 / (loss positions of that sample)


def build_batches(
    examples: Sequence[Example] | Sequence[LabeledExample],
    size: int,
    token_mask: str,
    net: ModelParts,
    dev: torch.device,
) -> tuple[list[Batch], int]:
    """The samples that have a loss token, checked against the model and its task, in micro-batches of `size`; and
    how many were left out.

    Raises:
        FormatError: a sample of the wrong kind for the task, empty, with a token outside the vocabulary or a label
            the head cannot take; no sample with a loss token.
    """
    kept = _kept(examples, net)
    batches = [_batch(kept[s : s + size], token_mask, net, dev) for s in range(0, len(kept), size)]
    return batches, len(examples) - len(kept)


def _kept(examples, net: ModelParts) -> list:
    vocab, task = net.config.vocab_size, net.task
    kept = []
    for n, e in enumerate(examples):
        labeled = isinstance(e, LabeledExample)
        if labeled != (task == CLASSIFY):
            raise FormatError(
                f"calibration sample {n}: {'labeled rows are' if labeled else 'token labels are'} not "
                f"what --task {task} calibrates on; "
                f"give {'labeled' if task == CLASSIFY else 'text'} rows"
            )
        if not e.input_ids or not labeled and len(e.input_ids) != len(e.labels):
            raise FormatError(
                f"calibration sample {n}: {len(e.input_ids)} token ids but "
                f"{1 if labeled else len(e.labels)} labels; they must match and not be empty"
            )
        bad = next((t for t in e.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise FormatError(
                f"calibration sample {n}: token id {bad} is outside the model's vocabulary of {vocab}; "
                "tokenize with the model's own tokenizer"
            )
        if labeled:
            net.check_label(n, e.label)
            kept.append(e)
        elif any(label != IGNORE for label in e.labels[task == CAUSAL_LM :]):  # causal: the first is never predicted
            kept.append(e)
    if not kept:
        where = "after the first position" if task == CAUSAL_LM else "at a masked position"
        raise FormatError(
            f"calibration data: none of the {len(examples)} samples has a loss token (a label other "
            f"than -100 {where}); give samples with {'completion' if task == CAUSAL_LM else 'masked'} "
            "tokens"
        )
    return kept


def _batch(group: list, token_mask: str, net: ModelParts, dev: torch.device) -> Batch:
    """One micro-batch, right-padded to its longest sample."""
    task = net.task
    T = max(len(e.input_ids) for e in group)
    ids = torch.full((len(group), T), net.pad_id, dtype=torch.long)
    types = torch.zeros(len(group), T, dtype=torch.long)
    attention = torch.zeros(len(group), T, dtype=torch.long)
    loss = torch.zeros(len(group), T, dtype=torch.bool)
    labels = torch.full((len(group), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(group):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
        if task == CLASSIFY:
            if e.token_type_ids is not None:
                types[i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        else:
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
    if task == CLASSIFY:  # the head reads the first token
        loss[:, 0] = True
    elif task == CAUSAL_LM:
        loss[:, :-1] = labels[:, 1:] != IGNORE
    else:
        loss = labels != IGNORE
    rows, cols = loss.nonzero(as_tuple=True)
    if task == CLASSIFY:
        targets = torch.tensor([e.label for e in group])[rows]
    else:
        targets = labels[rows, cols + (task == CAUSAL_LM)]
    weights = (1.0 / loss.sum(1).to(torch.float32))[rows]
    return Batch(
        ids.to(dev),
        attention.to(dev),
        torch.arange(T).expand(len(group), T).to(dev),
        types.to(dev),
        attention.bool().to(dev),
        (attention.bool() if token_mask == "attention" else loss).to(dev),
        rows.to(dev),
        cols.to(dev),
        targets.to(dev),
        weights.to(dev),
    )
