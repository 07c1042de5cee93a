"""BERT, RoBERTa and XLM-RoBERTa as calibration runs them: their parts, the padding mask, the MLM or classification
head (a new one drawn as `train` draws it) and its loss."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ...architectures import CLASSIFY, MASKED_LM, auto_class
from ...errors import FormatError
from . import masks
from .batches import Batch
from .parts import ModelParts

#: an encoder's layer modules, with or without the base model prefix (bert., roberta.)
ENCODER_MODULE = re.compile(r"^((?:\w+\.)?encoder\.layer\.)(\d+)\.(.+)$")


class EncoderParts(ModelParts):
    """BERT, RoBERTa, XLM-RoBERTa as masked LMs or sequence classifiers: embeddings (word, position, token type),
    encoder layers with the bidirectional padding mask, the MLM head or the classification head (BERT: pooler +
    classifier; RoBERTa: its two-layer head on the first token)."""

    KIND, EXAMPLE, PATTERN = (
        "an encoder",
        "[bert.|roberta.]encoder.layer.N.<module> (e.g. attention.self.query)",
        ENCODER_MODULE,
    )
    BUFFERS = {
        "position_ids": lambda config, shape: torch.arange(shape[-1]).expand(shape),
        "token_type_ids": lambda config, shape: torch.zeros(shape, dtype=torch.long),
    }

    def __init__(self, ckpt, task, dtype, dev, *, labels=None, seed=0):
        peft_type = {MASKED_LM: None, CLASSIFY: "SEQ_CLS"}[task]
        auto = auto_class(peft_type) or "AutoModelForMaskedLM"
        super().__init__(ckpt, task, auto, dtype, dev, overrides=labels if task == CLASSIFY else None)
        self.layers = self.core.encoder.layer
        self.pad_id = self.config.pad_token_id or 0
        self.generator = torch.Generator().manual_seed(seed)
        #: RoBERTa numbers positions from the padding index on, from the token ids; BERT from 0
        self.own_positions = hasattr(self.core.embeddings, "create_position_ids_from_input_ids")

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}.encoder.layer.{i}."

    def missing_hint(self) -> str:
        return f" (--task {self.task} needs the checkpoint's own {self.task} head)" if self.task == MASKED_LM else ""

    def embed(self, batches: list[Batch]) -> Iterator[torch.Tensor]:
        embed = self.load(self.core.embeddings)
        for batch in batches:
            yield embed(
                input_ids=batch.ids,
                token_type_ids=batch.types,
                position_ids=None if self.own_positions else batch.positions,
            )
        self.unload(embed)

    def head_parts(self) -> list[torch.nn.Module]:
        if self.task == MASKED_LM:
            head = next(m for n, m in self.model.named_children() if n != self.prefix)
            return [self.load(head)]
        parts = [self.load(self.model.classifier, init=self.generator)]  # a new head: drawn as train draws it
        pooler = getattr(self.core, "pooler", None)
        return ([self.load(pooler, init=self.generator)] if pooler is not None else []) + parts

    def head(self, parts: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        if self.task == MASKED_LM:
            return parts[0](x)
        if len(parts) == 2:  # BERT: classifier(dropout(pooler(h))), dropout off
            return parts[1](parts[0](x[:, None]))
        return parts[0](x[:, None])  # RoBERTa's head reads the first token itself

    def layer_kwargs(self, index: int, hidden: torch.Tensor, batch: Batch) -> dict:
        """What the model's own forward passes to encoder layer `index`: the bidirectional padding mask."""
        return {
            "attention_mask": masks.create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=batch.attention
            )
        }

    def check_label(self, n: int, label) -> None:
        size = self.config.num_labels
        if self.regression != isinstance(label, float) or not self.regression and not 0 <= label < size:
            raise FormatError(
                f"calibration sample {n}: label {label!r} does not fit the head ({size} "
                f"{'output: a number' if self.regression else 'classes: ids 0..' + str(size - 1)})"
            )

    @property
    def regression(self) -> bool:
        return self.config.problem_type == "regression" or self.config.num_labels == 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == CLASSIFY and self.regression:
            return (logits[:, 0] - labels.float()).square()
        return super().loss(logits, labels)
