"""The LoRA algebra every export shares: the change a trained adapter made as low-rank factors, re-compression to a
smaller rank with its error, one rank for every module, and the tolerance on the errors.

Factors follow PEFT: A [r, in], B [out, r], ΔW = s·B·A. A trained adapter started at s0·B0·A0 changed the model by
ΔW = s·B·A − s0·B0·A0 = s'·[B·s/s' | −B0·s0/s']·[A ; A0]: a rank-2r LoRA with one common scale s' (`delta_factors`).
Re-compressing B·A to rank k (`compress`) is exact up to truncation: QR of both factors, SVD of the small core, keep
the largest triplets; the dropped singular values give the relative Frobenius error.
"""

from __future__ import annotations

import math

import torch

from ..architectures import match
from ..errors import FormatError, NumericsError
from ..io.peft_adapter import Adapter


def config_scale(config: dict) -> float:
    """The scale s = α/r (α/√r with rsLoRA) of an adapter_config.json's common r and lora_alpha."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The lora_alpha that gives `scale` at `rank` (α = s·r, or s·√r with rsLoRA)."""
    return scale * (math.sqrt(rank) if rslora else rank)


def compress(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors (B' [out, k], A' [k, in]) of B·A (Eckart–Young), and the relative Frobenius error
    ‖B·A − B'·A'‖ / ‖B·A‖ of dropping the rest (0 for a zero product).

    Example:
        >>> B2, A2, err = compress(torch.randn(8, 4), torch.randn(4, 6), 2)  # doctest: +SKIP
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T)
    k = min(k, S.numel())
    root = S[:k].sqrt()
    total = float(S.square().sum())
    err = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return Qb @ (Uc[:, :k] * root), (root[:, None] * Vch[:k]) @ Qa.T, err


def pad_to_rank(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's (A, B) brought to `rank` with zero directions (rows of A, columns of B): the product is kept."""
    return {
        m: (
            torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0])),
            torch.nn.functional.pad(B, (0, rank - B.shape[1])),
        )
        for m, (A, B) in factors.items()
    }


def fit_rank(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], cap: int | None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Per module (B, A) re-compressed to at most `cap` (None: kept) as (A, B), and the error of each re-compressed
    module (`compress`); modules at or below the cap are kept exactly and have no entry."""
    out, errors = {}, {}
    for m, (B, A) in pairs.items():
        if cap is not None and B.shape[1] > cap:
            B, A, errors[m] = compress(B, A, cap)
        out[m] = (A, B)
    return out, errors


def check_tolerance(errors: dict[str, float], tolerance: float | None, what: str, todo: str) -> float:
    """The worst of `errors`; raise when one exceeds `tolerance`.

    Raises:
        NumericsError: "`what`: relative error above --tolerance T in MODULE (E), ...; `todo`".
    """
    worst = max(errors.values(), default=0.0)
    if tolerance is not None and worst > tolerance:
        bad = ", ".join(f"{m} ({e:.2e})" for m, e in sorted(errors.items()) if e > tolerance)
        raise NumericsError(f"{what}: relative error above --tolerance {tolerance} in {bad}; {todo}")
    return worst


def delta_factors(
    initial: Adapter, trained: Adapter, *, prefix: str | None = None, config: dict | None = None, offset: bool = True
) -> tuple[dict, float, dict]:
    """Per module (B', A') with s'·B'·A' = ΔW, the common scale s', and a per-module ΔW-is-zero flag.

    Keys are the trained adapter's module names; the initial adapter's may differ from them by the base model
    prefix (`prefix`, or looked up from the model `config` when the names differ). `offset`: the base was offset by
    s0·B0·A0 (or exact mode subtracted it); False for a `--no-offset` start, whose ΔW is s·B·A alone.

    Raises:
        FormatError: the adapters adapt different modules, or their factors' shapes differ.
    """
    names = match(initial.factors, trained.factors, prefix=prefix, config=config)
    if len(names) != len(initial.factors) or len(trained.factors) != len(initial.factors):
        unpaired = (set(initial.factors) - set(names)) | (set(trained.factors) - set(names.values()))
        raise FormatError(f"initial and trained adapters adapt different modules: {sorted(unpaired)}")
    initial = Adapter(initial.config, {names[m]: f for m, f in initial.factors.items()})
    s_common = config_scale(trained.config)
    out, unchanged = {}, {}
    for m, (A, B) in trained.factors.items():
        A0, B0 = initial.factors[m]
        if A.shape != A0.shape or B.shape != B0.shape:
            raise FormatError(
                f"{m}: trained factors {tuple(A.shape)}/{tuple(B.shape)} do not match the initial "
                f"{tuple(A0.shape)}/{tuple(B0.shape)}; pass the initial adapter this training "
                "started from"
            )
        s, s0 = trained.scale(m), initial.scale(m)
        if not offset or not B0.any():  # plain LoRA (B0 = 0) or no offset: ΔW = s·B·A, rank r
            out[m] = (B.double() * (s / s_common), A.double())
        else:
            B_cat = torch.cat([B.double() * (s / s_common), -B0.double() * (s0 / s_common)], dim=1)
            out[m] = (B_cat, torch.cat([A.double(), A0.double()], dim=0))
        unchanged[m] = torch.equal(A, A0) and torch.equal(B, B0) and s == s0
    return out, s_common, unchanged
