"""What every initialisation method is: one target matrix in, its initial factors (A0, B0) out.

A method says which role each target gets (`role_of`), whether it needs calibration data (`needs_data`,
with `prepare` run once before any factor), whether its initial product is subtracted from the base
(`offsets_base`), and how it computes the factors of one matrix (`factors`). The SVD methods share
`svd_factors`: with s the LoRA scale (α/r, or α/√r with rsLoRA) and W ≈ U Σ Vᵀ on the kept directions,
B0 = U √Σ / √s and A0 = √Σ Vᵀ / √s, so s·B0·A0 = U Σ Vᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .targets import MINOR, PRINCIPAL, Architecture

if TYPE_CHECKING:  # torch loads on first use, so that decompose can start copying while it loads
    import torch

    from ..experts import ExpertSlice
    from ..io.checkpoint import Checkpoint
    from ..io.tensorio import TensorInfo
    from .fused import Rows
    from .svd import Triplets


@dataclass(frozen=True)
class Job:
    """One target matrix: its module name, stored tensor, role, whether it is stored [in, out] (Conv1D), for a
    fused Q/K/V matrix with the SPLIT role which rows are Q, K and V (`init.fused.Rows`), and for an expert of a
    checkpoint that stores its experts fused (GPT-OSS) where in the stored 3-D tensor it lies (`part`)."""

    module: str
    tensor: TensorInfo
    role: str | None
    transposed: bool
    rows: Rows | None = None
    part: ExpertSlice | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in], whatever the storage order."""
        if self.part is not None:
            return self.part.shape
        return tuple(self.tensor.shape[::-1] if self.transposed else self.tensor.shape)

    def matrix(self, W: torch.Tensor) -> torch.Tensor:
        """The target's W [out, in] as a view of the stored tensor `W`."""
        if self.part is not None:
            return self.part.matrix(W)
        return W.T if self.transposed else W


@dataclass(frozen=True)
class Settings:
    """What a method's `factors` needs besides the matrix: rank, scale and the SVD/seed options."""

    rank: int
    scale: float
    svd: str = "randomized"
    niter: int = 4
    oversample: int = 8
    seed: int = 0


class InitMethod:
    """Base class of the init methods; each subclass lives in its own file and is registered in `__init__`."""

    name: str = ""
    #: one line for --help and the README
    summary: str = ""
    #: every target must get a role (principal/minor) from `role_of` or --role
    needs_roles: bool = True
    #: reads calibration samples (--data) in `prepare`
    needs_data: bool = False
    #: the residual W − s·B0·A0 replaces W (False: B0 = 0, the base is untouched)
    offsets_base: bool = True
    #: `factors` reads W (False: only its shape)
    needs_weights: bool = True
    #: with `offsets_base` False, whether training and convert still take s·B0·A0 out (plain LoRA: it is 0); False
    #: for methods whose start W + s·B0·A0 is PEFT's (MiCA: A0 = 0; orthogonal: B0·A0 = 0 up to rounding): the
    #: decompose manifest records `no_offset`, so the adapter trains and converts as a plain LoRA on the original
    subtracts_product: bool = True
    #: factors that stay frozen in training ("lora_B" for MiCA), recorded in the decompose manifest (`frozen`)
    frozen: tuple[str, ...] = ()

    def role_of(self, module: str, arch: Architecture) -> str | None:
        """The role of a target module of a model of `arch`; None: no role (the default, for methods that do not
        split the spectrum; with `needs_roles` that target is refused)."""
        return None

    def check_settings(self, settings: Settings) -> None:
        """Refuse settings this method cannot take (decompose and get_ailora_model call it before writing anything).

        Raises:
            OptionError: naming the option.
        """

    def prepare(self, ckpt: Checkpoint, jobs: list[Job], settings: Settings, **options) -> Any:
        """Work done once before any factor (e.g. calibration); its result is passed to `factors`."""
        return None

    def factors(
        self,
        job: Job,
        W: torch.Tensor | None,
        settings: Settings,
        *,
        context: Any = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(A0 [r, in], B0 [out, r]) in float32 and this module's manifest stats, for W [out, in]."""
        return svd_factors(W, job.role, settings, generator=generator)


class CalibratedFactors(InitMethod):
    """A data-aware method whose `prepare` computes every target's (A0, B0, stats) from calibration samples, by
    module name; `factors` hands each module its own."""

    needs_roles = False
    needs_data = True
    needs_weights = False

    def factors(self, job, W, settings, *, context=None, generator=None):
        return context[job.module]


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's scaling: α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def svd_factors(W: torch.Tensor, role: str, settings: Settings, *, generator=None, rank: int | None = None):
    """Factors from W's principal or minor singular triplets (`rank` of them, default the settings'), with the
    spectrum facts the manifest records."""
    from .svd import triplets

    t = triplets(
        W,
        settings.rank if rank is None else rank,
        role,
        mode=settings.svd,
        niter=settings.niter,
        oversample=settings.oversample,
        generator=generator,
    )
    A0, B0 = factors_from_triplets(t, settings.scale)
    stats = {
        "role": role,
        "sigma_max": t.sigma_max,
        "sigma_edge": float(t.S[-1] if role == PRINCIPAL else t.S[0]),
        "energy_fraction": t.energy_fraction,
        "deficient_directions": t.deficient,
    }
    return A0, B0, stats


def factors_from_triplets(t: Triplets, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) as float32, with s·B0·A0 = U Σ Vᵀ up to float32 rounding."""
    import torch

    root = (t.S / scale).sqrt()
    A0 = root[:, None] * t.Vh
    B0 = t.U * root[None, :]
    return A0.to(torch.float32).contiguous(), B0.to(torch.float32).contiguous()


__all__ = ["Job", "Settings", "InitMethod", "lora_scale", "svd_factors", "factors_from_triplets", "PRINCIPAL", "MINOR"]
