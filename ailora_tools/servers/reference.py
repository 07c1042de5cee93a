"""The model that was trained, as the manifests record it, run in transformers: what a served export must reproduce.

A trained adapter applies to the base it was trained on (decompose's residual, an NF4 residual, or the original)
and, trained in exact mode, with the initial product subtracted inside (`training.exact_mode`). An export
(`convert`, `convert --dora exact`, `export-base`, `merge`) records the adapter it came from, so every export leads
back to one trained adapter and its base (`trained_of`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.nf4_residual import float_view, is_quantized_residual
from ..errors import InputNotFoundError
from ..io.checkpoint import Checkpoint
from ..io.peft_adapter import CONFIG_NAME
from ..manifests import CONVERT_MANIFEST, TRAIN_MANIFEST, base_of, read_manifest
from ..quantization.nf4 import read_dequantized


@dataclass(frozen=True)
class Trained:
    """A trained model: `base` (a model directory) with `adapter` on it; `initial`: the initial adapter whose
    product is subtracted inside (trained in exact mode), else None."""

    base: str
    adapter: str | None = None
    initial: str | None = None

    def describe(self) -> str:
        on = f"{self.adapter} on {self.base}" if self.adapter else self.base
        return on + (f" minus the initial product of {self.initial}" if self.initial else "")


def trained_of(adapter: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Trained:
    """The trained model an adapter directory stands for: a `convert` output leads to the adapter it converted, a
    trained adapter to the base its ailora-train.json records (`base` when no manifest names one).

    Raises:
        InputNotFoundError: no manifest or config names the base.
    """
    d = Path(adapter)
    converted = read_manifest(d / CONVERT_MANIFEST)
    if converted.get("trained"):
        return trained_of(converted["trained"])
    if converted.get("adapter") and Path(converted["adapter"]) != d:  # `convert --for` of a LoRA on the original
        return trained_of(converted["adapter"], base=base)
    meant = base_of(d)
    train = read_manifest(d / TRAIN_MANIFEST)
    on = train.get("base") or meant.model or base or read_manifest(d / CONFIG_NAME).get("base_model_name_or_path")
    if not on:
        raise InputNotFoundError(f"{d}: no manifest or adapter_config.json names the model it was trained on")
    return Trained(str(on), str(d), train.get("initial_adapter") if meant.offset else None)


def reference_logprobs(trained: Trained, prompts: list[list[int]]) -> list[torch.Tensor]:
    """log p(token i | tokens before i), i = 1..n-1, of each prompt under the trained model in transformers (float32
    weights, float64 softmax)."""
    model = load_trained(trained)
    found = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            found.append(logp[:-1].gather(1, ids[0, 1:, None])[:, 0])
    return found


def load_trained(trained: Trained):
    """The trained model in transformers, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    if is_quantized_residual(trained.base):
        model = _dequantized(trained.base)
    else:
        model = AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32).eval()
    if trained.adapter is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, trained.adapter).eval()
    if trained.initial is not None:
        from ..io.peft_adapter import read_adapter
        from ..training.exact_mode import subtract_initial

        subtract_initial(model, read_adapter(trained.initial))
    return model


def _dequantized(residual: str):
    """An NF4 residual as the float model that was trained: its architecture in float32 with every weight as
    dequantised (bitsandbytes' own CPU forward is less precise than the servers compared with it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(residual)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ckpt = Checkpoint.open(residual)
    state = model.state_dict()
    stored = {n for n in float_view(ckpt, "F32")}
    model.load_state_dict({n: read_dequantized(ckpt, n).float() if n in stored else t for n, t in state.items()})
    model.tie_weights()
    return model.eval()
