"""DoRA (arXiv 2402.09353)'s maths as PEFT 0.21 implements it, for every stage: the initial magnitude (decompose,
get_ailora_model), the merged weight (merge) and the two rewrites as a standard LoRA (convert).

A DoRA module holds a LoRA pair (A [r, in], B [out, r], scale s) and a magnitude vector m [out]; its weight is

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖,  the norm taken per output feature (row of W [out, in]),

W being the base it applies to (decompose's residual, or the original model for plain LoRA). GPT-2's Conv1D
stores W transposed ([in, out]): every function here takes W as stored and `transposed`, and works on [out, in].
PEFT treats the norm as a constant in the backward pass and initialises m to ‖W + s·B0·A0‖, so step 0
reproduces the base (`magnitude`).

Conversion to a standard LoRA, two ways (`adapters.dora.convert_dora` streams a checkpoint through either):
- exact (`exact_parts`): with D = diag(m / ‖W + s·B·A‖), W' = D·W + s·(D·B)·A: a new base D·W plus the LoRA
  (D·B, A). Only the adapted matrices of the base change; the base is no longer the original.
- approximate (`approximate_factors`): the truncated SVD of ΔW = W' − W_original, with the relative Frobenius
  error of what is dropped, per module.
"""

from __future__ import annotations

import math

import torch

from ..errors import NumericsError, UnsupportedError


def oriented(W: torch.Tensor, transposed: bool) -> torch.Tensor:
    """W as [out, in] in float64 (Conv1D weights are stored transposed)."""
    return (W.T if transposed else W).double()


def _combined(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """W + s·B·A as [out, in] in float64."""
    return oriented(W, transposed) + scale * (B.double() @ A.double())


def magnitude(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, transposed: bool = False
) -> torch.Tensor:
    """m = ‖W + s·B·A‖ per output feature, float32 [out]: DoRA's initial magnitude, so that step 0 is the base.

    Args:
        W: the base weight as stored ([out, in]; [in, out] when `transposed`, GPT-2's Conv1D).
        A, B, scale: the initial LoRA pair and its scale s.

    Example:
        >>> m = magnitude(W_res, A0, B0, 2.0)  # doctest: +SKIP
    """
    return torch.linalg.vector_norm(_combined(W, A, B, scale, transposed), dim=1).float()


def scaling_of(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor, *, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D = m / ‖W + s·B·A‖ per output feature, W + s·B·A [out, in]), both float64."""
    V = _combined(W, A, B, scale, transposed)
    norm = torch.linalg.vector_norm(V, dim=1)
    if bool((norm == 0).any()):
        raise NumericsError("a row of W + s·B·A is zero, so DoRA's direction is undefined there; check the base")
    return m.double() / norm, V


def merged_weight(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor, *, transposed: bool = False
) -> torch.Tensor:
    """W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ in float64, stored like W (transposed back for Conv1D): PEFT's merge."""
    D, V = scaling_of(W, A, B, scale, m, transposed=transposed)
    out = D[:, None] * V
    return out.T if transposed else out


def exact_parts(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor, *, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new base D·W stored like W, D·B), float64, with D·W + s·(D·B)·A = W' exactly (up to rounding)."""
    D, _ = scaling_of(W, A, B, scale, m, transposed=transposed)
    base = D[:, None] * oriented(W, transposed)
    return (base.T if transposed else base), D[:, None] * B.double()


def approximate_factors(
    delta: torch.Tensor, *, max_rank: int | None, tolerance: float | None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Truncated SVD of ΔW [out, in]: (B' [out, k], A' [k, in]) with B'·A' the best rank-k approximation, the
    relative Frobenius error ‖ΔW − B'·A'‖ / ‖ΔW‖, and ‖ΔW‖. k is `max_rank`, or the smallest rank whose error is at
    most `tolerance` (capped by `max_rank` when both are given)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = S.square()
    total = float(energy.sum())
    # tail[k] = relative error of keeping k triplets
    tail = (energy.flip(0).cumsum(0).flip(0) / total).sqrt() if total > 0 else torch.zeros_like(S)
    tail = torch.cat([tail, tail.new_zeros(1)])
    k = S.numel() if max_rank is None else min(max_rank, S.numel())
    if tolerance is not None:
        fits = (tail <= tolerance).nonzero()
        k = min(k, int(fits[0]) if fits.numel() else S.numel())
    k = max(k, 1)
    root = S[:k].sqrt()
    err = float(tail[k]) if total > 0 else 0.0
    return U[:, :k] * root, root[:, None] * Vh[:k], err, math.sqrt(total)


def check_initial_offset(initial) -> None:
    """DoRA's norm is that of the base the adapter sees: an adapter trained on the original model with s·B0·A0
    subtracted (`--no-residual`) has no such base in PEFT, so it is refused.

    Raises:
        UnsupportedError: a DoRA adapter with a non-zero initial product.
    """
    if initial.config.get("use_dora") and any(bool(B0.any()) for _, B0 in initial.factors.values()):
        raise UnsupportedError(
            "DoRA with an initial product on the original model (--no-residual) is not supported: "
            "PEFT's DoRA norm would include s·B0·A0; decompose with the residual "
            "(drop --no-residual)"
        )


def magnitudes_of(
    ckpt, tensor_of: dict[str, str], factors: dict, scale: float, *, transposed: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """DoRA's initial magnitude of every module (`magnitude`), reading only each module's weight from `ckpt` (an
    `io.checkpoint.Checkpoint` of the base the adapter applies to; `tensor_of`: module -> tensor name)."""
    from ..io.tensorio import read_tensor

    out = {}
    for module, (A0, B0) in factors.items():
        info = ckpt.tensors[tensor_of[module]]
        W = read_tensor(ckpt.shard(info.file), info.name)
        out[module] = magnitude(W, A0, B0, scale, transposed=transposed[module])
    return out
