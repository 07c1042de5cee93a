"""Llama, Mistral and Qwen2 as calibration runs them: their parts and what their own forward passes each layer."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from . import masks
from .batches import Batch
from .parts import ModelParts

#: a decoder layer's modules
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class DecoderParts(ModelParts):
    """Llama, Mistral, Qwen2 as causal LMs: embed_tokens, decoder layers with rotary embeddings and causal masks,
    final norm + lm_head."""

    KIND, EXAMPLE, PATTERN = "a decoder", "model.layers.N.<module> (e.g. self_attn.q_proj)", LAYER_MODULE

    def __init__(self, ckpt, task, dtype, dev, **_):
        super().__init__(ckpt, task, "AutoModelForCausalLM", dtype, dev)
        self.layers = self.core.layers
        self.rotary = type(self.core.rotary_emb)(config=self.config).to(dev)

    def stored_dtype(self) -> str | None:
        stored = self.ckpt.tensors.get("model.embed_tokens.weight")
        return stored.dtype if stored is not None else None

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def embed(self, batches: list[Batch]) -> Iterator[torch.Tensor]:
        embed = self.load(self.core.embed_tokens)
        for batch in batches:
            yield embed(batch.ids)
        self.unload(embed)

    def head_parts(self) -> list[torch.nn.Module]:
        return [self.load(self.core.norm), self.load(self.model.lm_head)]

    def head(self, parts: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        norm, lm_head = parts
        return lm_head(norm(x))

    def layer_kwargs(self, index: int, hidden: torch.Tensor, batch: Batch) -> dict:
        """What the model's own forward passes to decoder layer `index`: mask, rotary cos/sin, positions."""
        if self.config.model_type == "qwen2":
            sliding = self.config.layer_types[index] == "sliding_attention"
        else:
            sliding = self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None) is not None
        make = masks.create_sliding_window_causal_mask if sliding else masks.create_causal_mask
        mask = make(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=batch.attention,
            position_ids=batch.positions,
            **masks.no_cache(make),
        )
        return {
            "attention_mask": mask,
            "position_embeddings": self.rotary(hidden, batch.positions),
            "position_ids": batch.positions,
        }
