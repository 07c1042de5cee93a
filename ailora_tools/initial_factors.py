"""Initial factors only (`decompose --no-residual`): A0, B0 of every target, and no residual written.

For training on the ORIGINAL weights with the initial product subtracted inside the adapter
(`initial_offset`): each target W is read alone by its byte range, decomposed, and dropped; no shard is
copied, so the cost is the SVDs and reading the targets, whatever the checkpoint's size.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .methods import factors_from_triplets
from .tensorio import TensorInfo, read_tensor


def initial_factors(
    ckpt: Checkpoint, roles: dict[str, str], weights: dict[str, TensorInfo], *, transposed: dict[str, bool],
    rank: int, scale: float, svd: dict, progress: bool = True,
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Per module: the manifest stats (no reconstruction error: nothing is reconstructed) and (A0, B0).

    Args:
        ckpt: the source checkpoint. roles: module -> "principal" | "minor". weights: module -> its tensor.
        transposed: module -> stored as [in, out] (GPT-2's Conv1D).
        rank, scale: LoRA rank and s. svd: {"mode", "niter", "oversample", "seed", "device"}; "ran_on" is
            set to the device used.

    Raises:
        NumericsError: a target holding NaN or Inf.

    Example:
        >>> stats, factors = initial_factors(ckpt, roles, weights, transposed={}, rank=16, scale=1.0,
        ...                                  svd={"mode": "randomized", "niter": 4, "oversample": 8,
        ...                                       "seed": 0, "device": "auto"})  # doctest: +SKIP
    """
    import torch

    from .errors import NumericsError
    from .svd import generator_for, resolve_device, triplets
    from .targets import PRINCIPAL

    device = resolve_device(svd["device"])
    svd["ran_on"] = str(device)
    stats, factors = {}, {}
    for m in tqdm(sorted(roles, key=lambda m: (weights[m].file, weights[m].begin)), desc="decompose",
                  disable=not progress):
        info = weights[m]
        W = read_tensor(ckpt.headers[info.file], info.name)
        W = (W.T if transposed[m] else W).to(device, torch.float64 if info.dtype in ("F32", "F64") else torch.float32)
        if not bool(torch.isfinite(torch.linalg.vector_norm(W))):
            raise NumericsError(f"{info.file}: tensor {info.name!r} holds NaN or Inf; fix the checkpoint first")
        t = triplets(W, rank, roles[m], mode=svd["mode"], niter=svd["niter"], oversample=svd["oversample"],
                     generator=generator_for(svd["seed"], m, device))
        A0, B0 = factors_from_triplets(t, scale)
        factors[m] = (A0.cpu(), B0.cpu())
        stats[m] = {"tensor": info.name, "shard": info.file, "shape": list(info.shape), "dtype": info.dtype,
                    "role": roles[m], "sigma_max": t.sigma_max,
                    "sigma_edge": float(t.S[-1] if roles[m] == PRINCIPAL else t.S[0]),
                    "energy_fraction": t.energy_fraction, "deficient_directions": t.deficient}
    return stats, factors
