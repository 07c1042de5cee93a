"""PEFT's `init_lora_weights="orthogonal"`: random A0 and B0 built from the rows of one random orthogonal r×r matrix
Q, A0 = (G_A·Q[0::2])ᵀ/10 and B0 = G_Bᵀ·Q[1::2]/10 with Gaussian G_A [in, r/2], G_B [r/2, out]. The even and odd rows of
Q are orthogonal, so B0·A0 = 0 up to float32 rounding: the base is left as it is and step 0 reproduces the model
(within ~1e-6), although neither factor is zero. The rank must be even.

The draws are PEFT's, in its order (randn(r, r), randn(in, r/2), randn(r/2, out)), from this module's seeded generator
(`svd.generator_for`) rather than the global RNG: the same as PEFT's `orthogonal_init` run with the global seed set
to that generator's seed. The decompose manifest records `no_offset`: the adapter trains and converts as a plain
LoRA on the original (convert writes s·B·A, rank r).
"""

from __future__ import annotations

from ..errors import OptionError
from .method import InitMethod


class Orthogonal(InitMethod):
    name = "orthogonal"
    summary = "random orthogonal A0, B0 with B0·A0 = 0, even rank, no residual written (PEFT's orthogonal)"
    needs_roles = False
    offsets_base = False
    needs_weights = False
    subtracts_product = False

    def check_settings(self, settings):
        if settings.rank % 2:
            raise OptionError(
                f"{{rank}} {settings.rank}: {self.name} needs an even rank (PEFT's orthogonal init "
                f"splits one r×r orthogonal matrix in two halves); pass {settings.rank + 1}"
            )

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        self.check_settings(settings)
        r, (out_f, in_f) = settings.rank, job.shape
        Q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
        A0 = torch.randn(in_f, r // 2, generator=generator).mm(Q[0::2]).T / 10.0
        B0 = torch.randn(r // 2, out_f, generator=generator).T.mm(Q[1::2]) / 10.0
        return A0.contiguous(), B0.contiguous(), {"role": None}
