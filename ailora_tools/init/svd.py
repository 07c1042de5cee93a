"""Principal and minor singular triplets of one weight matrix, on CPU or GPU.

- exact, principal: float32 subspace iteration with Rayleigh–Ritz until every kept triplet's residual
  ||W v − σ u|| is at most EXACT_TOL · σ_max, then a float64 Rayleigh–Ritz step; if that has not
  converged after EXACT_MAXIT iterations (flat spectra), or the matrix is small, the Gram method below.
- exact, minor (and the fallback): eigendecomposition of the float64 Gram matrix of the smaller side
  (W Wᵀ or Wᵀ W). The other side comes from a projection (U_rᵀ W = Σ_r V_rᵀ) normalised by its row
  norms, never from dividing by a possibly tiny σ. Accurate for the smallest singular values, which a
  float32 Gram matrix cannot see.
- randomized (principal only): seeded range finder with oversampling and a fixed number of power
  iterations, no convergence test (PiSSA's `pissa_niter_N`, but deterministic).
Directions whose σ is numerically zero (rank-deficient W: below the noise level of the method that found
it, see `_complete`) get an arbitrary orthonormal completion and σ set to that floor, so the adapter never
starts at exactly zero; the residual absorbs the difference.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .targets import PRINCIPAL

EXACT_TOL = 1e-5
EXACT_MAXIT = 30
EPS64 = torch.finfo(torch.float64).eps
#: σ/σ_max below which the float64 Gram method cannot tell a direction from zero (σ² under eps64·σ_max²)
GRAM_NOISE = math.sqrt(EPS64)


@dataclass
class Triplets:
    """W ≈ U diag(S) Vh on r kept directions, plus what the manifest reports."""

    U: torch.Tensor  # [out, r] float64
    S: torch.Tensor  # [r] float64, descending
    Vh: torch.Tensor  # [r, in] float64
    sigma_max: float
    energy_fraction: float  # sum of kept σ² over ||W||_F²
    deficient: int  # directions completed because σ was numerically zero


def generator_for(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, module name), so each module's draw is independent of run order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def triplets(
    W: torch.Tensor, r: int, role: str, *, mode: str = "exact", niter: int = 4, oversample: int = 8,
    generator: torch.Generator | None = None,
) -> Triplets:
    """The r principal (largest) or minor (smallest) singular triplets of W.

    Args:
        W: [out, in] matrix, any float dtype, on the device to compute on (float64 is used where it matters).
        r: number of triplets, 0 < r < min(out, in).
        role: "principal" or "minor". Minor always uses the exact method.
        mode: "exact" or "randomized".
        niter, oversample, generator: randomized settings.

    Example:
        >>> t = triplets(torch.randn(64, 32), 4, "minor")
        >>> t.U.shape, t.S.shape, t.Vh.shape
        (torch.Size([64, 4]), torch.Size([4]), torch.Size([4, 32]))
    """
    fro2 = float(torch.linalg.vector_norm(W)) ** 2
    found, noise = None, math.sqrt(max(W.shape) * EPS64)  # float32 paths: above their products' rounding
    if role == PRINCIPAL and mode == "randomized":
        found = _randomized(W.to(torch.float32), r, niter, oversample, generator)
    elif role == PRINCIPAL and min(W.shape) > 4 * (r + max(r, oversample)):
        found = _subspace(W.to(torch.float32), W, r, max(r, oversample), generator)
    if found is None:
        found, noise = _gram(W.to(torch.float64), r, largest=role == PRINCIPAL), GRAM_NOISE
    U, S, Vh, smax = found
    U, S, Vh = U.double(), S.double(), Vh.double()
    U, S, Vh, deficient = _complete(U, S, Vh, max(smax, torch.finfo(torch.float64).tiny) * noise, generator)
    energy = float(S.square().sum()) / fro2 if fro2 > 0 else 0.0
    return Triplets(U, S, Vh, smax, min(energy, 1.0), deficient)


def _gram(W: torch.Tensor, r: int, largest: bool):
    left = W.shape[0] <= W.shape[1]
    G = W @ W.T if left else W.T @ W
    evals, evecs = torch.linalg.eigh(G)  # ascending
    X = evecs[:, -r:].flip(1) if largest else evecs[:, :r].flip(1)  # descending σ either way
    smax = float(evals[-1].clamp(min=0).sqrt())
    if left:
        P = X.T @ W  # rows σ_i v_iᵀ
        S = P.norm(dim=1)
        return X, S, P / S.clamp(min=torch.finfo(W.dtype).tiny)[:, None], smax
    Q = W @ X  # columns σ_i u_i
    S = Q.norm(dim=0)
    return Q / S.clamp(min=torch.finfo(W.dtype).tiny), S, X.T, smax


def _randomized(W: torch.Tensor, r: int, niter: int, oversample: int, gen: torch.Generator | None):
    k = min(r + oversample, min(W.shape))
    omega = torch.randn(W.shape[1], k, generator=gen, dtype=W.dtype, device=W.device)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(niter):
        Q = _power_step(W, Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Ub)[:, :r], S[:r], Vh[:r], float(S[0])


def _power_step(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """One orthonormalised power iteration, W Wᵀ Q; Wᵀ Q is computed as (Qᵀ W)ᵀ, twice as fast on CPU (MKL)."""
    return torch.linalg.qr(W @ torch.linalg.qr((Q.T @ W).T).Q).Q


def _subspace(W: torch.Tensor, W_in: torch.Tensor, r: int, p: int, gen: torch.Generator | None):
    """Converged principal triplets, or None when EXACT_MAXIT iterations do not reach EXACT_TOL."""
    omega = torch.randn(W.shape[1], r + p, generator=gen, dtype=W.dtype, device=W.device)
    Q = torch.linalg.qr(W @ omega).Q
    for it in range(1, EXACT_MAXIT + 1):
        Q = _power_step(W, Q)
        if it < 4 or it % 2:  # a convergence test costs about one iteration: test from the 4th, every other
            continue
        Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
        U = Q @ Ub[:, :r]
        residual = (W @ Vh[:r].T - U * S[:r]).norm(dim=0).max()
        if residual <= EXACT_TOL * S[0]:
            Q = Q.double()  # float64 Rayleigh–Ritz, W upcast a row block at a time
            rows = max(1, (4 << 20) // (8 * W.shape[1]))
            B = sum(Q[i:i + rows].T @ W_in[i:i + rows].double() for i in range(0, W.shape[0], rows))
            Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
            return Q @ Ub[:, :r], S[:r], Vh[:r], float(S[0])
    return None


def _complete(U, S, Vh, floor: float, gen: torch.Generator | None):
    """Replace directions with σ ≤ `floor` (numerically zero) by an orthonormal completion with σ = floor.

    The floor is the noise level of the method that found S. Float64 Gram method: √eps64·σ_max (1.5e-8),
    where σ² falls under the rounding of the Gram matrix. Exact null directions (duplicated rows, zero
    columns, float64 low-rank products) come out of it at 1e-16 to 1e-12·σ_max, while genuine singular
    values of square matrices go down to about 5e-7·σ_max at 8192² (bench_svd's spectrum): a floor of
    √(n·eps64)·σ_max, the worst-case bound on forming the Gram matrix (1.3e-6 at n = 8192), took those
    for zero. Float32 paths (randomized, subspace iteration): √(n·eps64)·σ_max, above the rounding of
    their float32 products (measured up to 3e-8·σ_max on rank-deficient matrices).
    """
    bad = S <= floor
    if not bool(bad.any()):
        return U, S, Vh, 0
    for M in (U.T, Vh):  # rows to complete
        rnd = torch.randn(M.shape, generator=gen, dtype=torch.float32, device=M.device).to(M.dtype)
        rows = torch.where(bad[:, None], rnd, M)
        order = torch.cat([torch.nonzero(~bad).flatten(), torch.nonzero(bad).flatten()])
        Q, R = torch.linalg.qr(rows[order].T)
        Q = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # keep the good rows' signs
        M[order] = Q.T
    S = torch.where(bad, torch.full_like(S, floor), S)
    return U, S, Vh, int(bad.sum())
