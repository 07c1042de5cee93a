"""MiCA (arXiv 2604.01694), as PEFT's `init_lora_weights="mica"`: B0 = the r left singular vectors of W with the
smallest singular values (U[:, -r:], in descending σ), A0 = 0, the base untouched. B stays frozen in training: only A
learns, so the change s·B·A stays in W's minor output directions.

The adapter applies to the original model (no residual is written) and starts exactly there (A0 = 0); the decompose
manifest records `frozen: ["lora_B"]` (train freezes it) and `no_offset` (convert writes s·B·A, rank r). Singular
vectors have a free sign each; ours come from the float64 Gram method (`svd.triplets`, minor directions exact), PEFT's
from a float32 SVD, so B0 agrees with PEFT's up to the sign of each column.
"""

from __future__ import annotations

from .method import InitMethod
from .targets import MINOR


class MiCA(InitMethod):
    name = "mica"
    summary = "frozen B0 = minor left singular vectors, A0 = 0, no residual written (PEFT's mica)"
    offsets_base = False
    subtracts_product = False
    frozen = ("lora_B",)

    def role_of(self, module, arch):
        return MINOR

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        from .svd import triplets

        t = triplets(
            W,
            settings.rank,
            job.role,
            mode=settings.svd,
            niter=settings.niter,
            oversample=settings.oversample,
            generator=generator,
        )
        stats = {
            "role": job.role,
            "sigma_max": t.sigma_max,
            "sigma_edge": float(t.S[0] if job.role == MINOR else t.S[-1]),
            "energy_fraction": t.energy_fraction,
            "deficient_directions": t.deficient,
        }
        A0 = torch.zeros(settings.rank, job.shape[1], dtype=torch.float32)
        return A0, t.U.to(torch.float32).contiguous(), stats
