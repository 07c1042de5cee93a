"""Initialisation methods: which role each target gets, and the initial factors A0, B0.

With s the LoRA scale (α/r, or α/√r with rsLoRA) and W ≈ U Σ Vᵀ on the kept directions:
B0 = U √Σ / √s and A0 = √Σ Vᵀ / √s, so s·B0·A0 = U Σ Vᵀ. Plain LoRA: Kaiming-uniform A0, B0 = 0.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .targets import MINOR, PRINCIPAL

if TYPE_CHECKING:  # torch loads on first use, so that decompose can start copying while it loads
    import torch

    from .svd import Triplets

#: method -> roles given to targets: one role for all, "ailora" (per projection), or None (plain LoRA)
METHODS: dict[str, str | None] = {"ailora": "ailora", "pissa": PRINCIPAL, "milora": MINOR, "lora": None}


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's scaling: α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def factors_from_triplets(t: Triplets, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) as float32, with s·B0·A0 = U Σ Vᵀ up to float32 rounding."""
    import torch

    root = (t.S / scale).sqrt()
    A0 = root[:, None] * t.Vh
    B0 = t.U * root[None, :]
    return A0.to(torch.float32).contiguous(), B0.to(torch.float32).contiguous()


def kaiming_factors(shape: tuple[int, int], rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: A0 Kaiming-uniform (a=√5), B0 = 0."""
    import torch

    out_f, in_f = shape
    A0 = torch.empty(rank, in_f)
    torch.nn.init.kaiming_uniform_(A0, a=math.sqrt(5), generator=generator)
    return A0, torch.zeros(out_f, rank)
