"""One target matrix W: its initial factors (A0, B0) and the residual W − s·B0·A0 that replaces it.

The factors come from the init method on the chosen device. The residual is computed from the stored float32
factors in float64 for float32/64 checkpoints and in float32 for 16-bit ones (far finer than their rounding),
in W's own copy a row block at a time, then cast to the stored dtype. Peak memory: 64 MiB + 16 × W in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import NumericsError
from ..init import InitMethod, Job, Settings
from ..init.svd import generator_for
from ..io.tensorio import torch_dtype


def residual_target(
    job: Job,
    W: torch.Tensor,
    method: InitMethod,
    settings: Settings,
    *,
    context: Any = None,
    device: torch.device,
    out_dtype: str | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict]:
    """(residual as stored, (A0, B0) in float32 on the CPU, the module's manifest stats) for one target:
    `initial_factors` then `residual_of`, in one working copy of W.

    Args:
        job: the target (W is stored [in, out] when `job.transposed`, as GPT-2's Conv1D).
        W: its stored values. method, settings, context: what computes the factors (`ailora_tools.init`).
        device: where to compute. out_dtype: safetensors dtype to store (default: W's).

    Raises:
        NumericsError: W, or the factors computed from it, hold NaN or Inf.
    """
    Wc = working_copy(job, W, device)
    A0, B0, stats = initial_factors(job, Wc, method, settings, context=context, device=device)
    stored, recon = residual_of(job, Wc, A0, B0, settings.scale, out_dtype=out_dtype)
    return stored, (A0, B0), {**stats, **recon}


def working_copy(job: Job, W: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The target's W [out, in] (`Job.matrix` of the stored tensor `W`) on `device`, in float64 for float32/64
    checkpoints and float32 for 16-bit ones; our own copy, which `residual_of` overwrites.

    Raises:
        NumericsError: W holds NaN or Inf.
    """
    work = torch.float64 if job.tensor.dtype in ("F32", "F64") else torch.float32
    Wc = job.matrix(W).to(device, work, copy=True)
    if not bool(torch.isfinite(torch.linalg.vector_norm(Wc))):
        raise NumericsError(f"{job.tensor.file}: tensor {job.tensor.name!r} holds NaN or Inf; fix the checkpoint first")
    return Wc


def initial_factors(
    job: Job,
    Wc: torch.Tensor | None,
    method: InitMethod,
    settings: Settings,
    *,
    context: Any = None,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(A0, B0) in float32 on the CPU and the module's manifest stats, from its `working_copy` (left unchanged;
    None for methods that do not read W).

    Raises:
        NumericsError: the factors hold NaN or Inf.
    """
    info = job.tensor
    A0, B0, stats = method.factors(
        job, Wc, settings, context=context, generator=generator_for(settings.seed, job.module, device)
    )
    check_factors(job, A0, B0)
    stats = {"tensor": info.name, "shard": info.file, "shape": list(info.shape), "dtype": info.dtype, **stats}
    return A0.float().cpu(), B0.float().cpu(), stats


def residual_of(
    job: Job, Wc: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float, *, out_dtype: str | None
) -> tuple[torch.Tensor, dict]:
    """The residual Wc − scale·B0·A0 as stored (in `out_dtype`, default the checkpoint's; built in Wc's memory; an
    expert slice's as its W [out, in], for the caller to write into the 3-D tensor) and its reconstruction error
    against W (`recon_max_abs`, `recon_rel_fro`)."""
    norm = float(torch.linalg.vector_norm(Wc))
    A, sB = A0.to(Wc.device, Wc.dtype), B0.to(Wc.device, Wc.dtype) * scale
    stored, err_max, err_fro = _residual_rows(Wc, A, sB, torch_dtype(out_dtype or job.tensor.dtype))
    return (stored.T if job.transposed else stored), {
        "recon_max_abs": err_max,
        "recon_rel_fro": err_fro / max(norm, torch.finfo(Wc.dtype).tiny),
    }


def check_factors(job: Job, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Refuse factors holding NaN or Inf: written out, they would make every output tensor NaN.

    Raises:
        NumericsError: naming the module.
    """
    if not (bool(torch.isfinite(A0).all()) and bool(torch.isfinite(B0).all())):
        raise NumericsError(
            f"{job.module}: the initial factors hold NaN or Inf (check --alpha, --rank and the "
            f"weights of {job.tensor.name!r} in {job.tensor.file})"
        )


def _residual_rows(W: torch.Tensor, A: torch.Tensor, sB: torch.Tensor, dtype: torch.dtype):
    """W − sB·A cast to `dtype`, built in W's memory in row blocks of about 4 MiB (so temporaries stay small
    whatever the matrix size); also the max-abs and Frobenius norm of (stored + sB·A) − W."""
    stored = torch.empty(W.shape, dtype=dtype, device=W.device)
    rows = max(1, (4 << 20) // (W.shape[1] * W.element_size()))
    err_max, err_sq = 0.0, 0.0
    for i in range(0, W.shape[0], rows):
        block = W[i : i + rows].sub_(sB[i : i + rows] @ A)  # residual rows, in place: W is not needed again
        stored[i : i + rows] = block
        err = stored[i : i + rows].to(W.dtype).sub_(block)
        err_max = max(err_max, float(err.abs().max()))
        err_sq += float(err.square().sum())
    if not (err_max == err_max and err_sq == err_sq):  # NaN
        raise NumericsError("the residual holds NaN; check the checkpoint's weights and --alpha")
    return stored, err_max, err_sq**0.5
