"""Plain LoRA (PEFT's default): A0 Kaiming-uniform (a = √5), B0 = 0, so the base is left untouched."""

from __future__ import annotations

import math

from .method import InitMethod


class LoRA(InitMethod):
    name = "lora"
    summary = "Kaiming A, B = 0 (no residual written)"
    needs_roles = False
    offsets_base = False
    needs_weights = False

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        out_f, in_f = job.shape
        A0 = torch.empty(settings.rank, in_f)
        torch.nn.init.kaiming_uniform_(A0, a=math.sqrt(5), generator=generator)
        return A0, torch.zeros(out_f, settings.rank), {"role": None}
