"""One target matrix W: its initial factors (A0, B0) and the residual W − s·B0·A0 that replaces it.

The SVD runs on the chosen device. The residual is computed from the stored float32 factors in float64
for float32/64 checkpoints and in float32 for 16-bit ones (far finer than their rounding), in W's own
copy a row block at a time, then cast to the stored dtype. Peak memory: 64 MiB + 16 × W in float32.
"""
from __future__ import annotations

import torch

from .errors import NumericsError
from .methods import factors_from_triplets
from .svd import generator_for, triplets
from .targets import PRINCIPAL
from .tensorio import TensorInfo, torch_dtype


def residual_target(
    info: TensorInfo, W: torch.Tensor, *, module: str, role: str, transposed: bool, rank: int, scale: float,
    svd: dict, device: torch.device, out_dtype: str | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict]:
    """(residual as stored, (A0, B0) in float32 on the CPU, the module's manifest stats) for one target.

    Args:
        info, W: the stored tensor and its values ([in, out] when `transposed`, as GPT-2's Conv1D).
        module, role: module name (seeds its draw) and "principal" or "minor".
        svd: {"mode", "niter", "oversample", "seed"}. out_dtype: safetensors dtype to store (default: W's).

    Raises:
        NumericsError: W holds NaN or Inf.
    """
    work = torch.float64 if info.dtype in ("F32", "F64") else torch.float32
    Wc = (W.T if transposed else W).to(device, work, copy=True)  # our own copy: the residual is built in it
    norm = torch.linalg.vector_norm(Wc)
    if not bool(torch.isfinite(norm)):
        raise NumericsError(f"{info.file}: tensor {info.name!r} holds NaN or Inf; fix the checkpoint first")
    t = triplets(Wc, rank, role, mode=svd["mode"], niter=svd["niter"], oversample=svd["oversample"],
                 generator=generator_for(svd["seed"], module, device))
    A0, B0 = factors_from_triplets(t, scale)
    stored, err_max, err_fro = _residual_rows(Wc, A0.to(work), B0.to(work) * scale, torch_dtype(out_dtype or info.dtype))
    stats = {
        "tensor": info.name, "shard": info.file, "shape": list(info.shape), "dtype": info.dtype,
        "role": role, "sigma_max": t.sigma_max, "sigma_edge": float(t.S[-1] if role == PRINCIPAL else t.S[0]),
        "energy_fraction": t.energy_fraction, "deficient_directions": t.deficient,
        "recon_max_abs": err_max, "recon_rel_fro": err_fro / max(float(norm), torch.finfo(work).tiny),
    }
    return (stored.T if transposed else stored), (A0.cpu(), B0.cpu()), stats


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
    return stored, err_max, err_sq ** 0.5
