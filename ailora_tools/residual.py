"""One target matrix W: its initial factors (A0, B0) and the residual W − s·B0·A0 that replaces it.

The factors come from the init method on the chosen device. The residual is computed from the stored float32
factors in float64 for float32/64 checkpoints and in float32 for 16-bit ones (far finer than their rounding),
in W's own copy a row block at a time, then cast to the stored dtype. Peak memory: 64 MiB + 16 × W in float32.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import NumericsError
from .init import InitMethod, Job, Settings
from .svd import generator_for
from .tensorio import torch_dtype


def residual_target(
    job: Job, W: torch.Tensor, method: InitMethod, settings: Settings, *, context: Any = None,
    device: torch.device, out_dtype: str | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict]:
    """(residual as stored, (A0, B0) in float32 on the CPU, the module's manifest stats) for one target.

    Args:
        job: the target (W is stored [in, out] when `job.transposed`, as GPT-2's Conv1D).
        W: its stored values. method, settings, context: what computes the factors (`ailora_tools.init`).
        device: where to compute. out_dtype: safetensors dtype to store (default: W's).

    Raises:
        NumericsError: W, or the factors computed from it, hold NaN or Inf.
    """
    info = job.tensor
    work = torch.float64 if info.dtype in ("F32", "F64") else torch.float32
    Wc = (W.T if job.transposed else W).to(device, work, copy=True)  # our own copy: the residual is built in it
    norm = torch.linalg.vector_norm(Wc)
    if not bool(torch.isfinite(norm)):
        raise NumericsError(f"{info.file}: tensor {info.name!r} holds NaN or Inf; fix the checkpoint first")
    A0, B0, stats = method.factors(job, Wc, settings, context=context,
                                   generator=generator_for(settings.seed, job.module, device))
    check_factors(job, A0, B0)
    stored, err_max, err_fro = _residual_rows(Wc, A0.to(work), B0.to(work) * settings.scale,
                                              torch_dtype(out_dtype or info.dtype))
    stats = {"tensor": info.name, "shard": info.file, "shape": list(info.shape), "dtype": info.dtype, **stats,
             "recon_max_abs": err_max, "recon_rel_fro": err_fro / max(float(norm), torch.finfo(work).tiny)}
    return (stored.T if job.transposed else stored), (A0.cpu(), B0.cpu()), stats


def check_factors(job: Job, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Refuse factors holding NaN or Inf: written out, they would make every output tensor NaN.

    Raises:
        NumericsError: naming the module.
    """
    if not (bool(torch.isfinite(A0).all()) and bool(torch.isfinite(B0).all())):
        raise NumericsError(f"{job.module}: the initial factors hold NaN or Inf (check --alpha, --rank and the "
                            f"weights of {job.tensor.name!r} in {job.tensor.file})")


def _residual_rows(W: torch.Tensor, A: torch.Tensor, sB: torch.Tensor, dtype: torch.dtype):
    """W − sB·A cast to `dtype`, built in W's memory in row blocks of about 4 MiB (so temporaries stay small
    whatever the matrix size); also the max-abs and Frobenius norm of (stored + sB·A) − W."""
    stored = torch.empty(W.shape, dtype=dtype, device=W.device)
    rows = max(1, (4 << 20) // (W.shape[1] * W.element_size()))
    err_max, err_sq = 0.0, 0.0
    for i in range(0, W.shape[0], rows):
        block = W[i:i + rows].sub_(sB[i:i + rows] @ A)  # residual rows, in place: W is not needed again
        stored[i:i + rows] = block
        err = stored[i:i + rows].to(W.dtype).sub_(block)
        err_max = max(err_max, float(err.abs().max()))
        err_sq += float(err.square().sum())
    if not (err_max == err_max and err_sq == err_sq):  # NaN
        raise NumericsError("the residual holds NaN; check the checkpoint's weights and --alpha")
    return stored, err_max, err_sq ** 0.5
