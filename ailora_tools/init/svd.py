"""Principal and minor singular triplets of one weight matrix, on CPU or GPU.

- exact, principal: float32 block Krylov (Golub–Kahan) with Rayleigh–Ritz: the basis grows by blocks of
  r + KRYLOV_EXTRA (Q, W Wᵀ Q, (W Wᵀ)² Q, ..., orthonormalised) until every kept triplet's residual
  ||W v − σ u|| is at most EXACT_TOL · σ_max. Its cost follows the spectrum's gaps. Before each step a
  flop model compares the steps the measured convergence rate still needs with the float32 Gram method
  (eigendecomposition of the Gram matrix of the smaller side); where that is cheaper (small matrices,
  flat spectra) Krylov stops or never starts and the Gram method gives the basis. Either basis gets a
  float64 Rayleigh–Ritz step and a float64 residual check; only if that fails, the float64 Gram method.
- exact, minor (and the last fallback): eigendecomposition of the float64 Gram matrix of the smaller side
  (W Wᵀ or Wᵀ W). The other side comes from a projection (U_rᵀ W = Σ_r V_rᵀ) normalised by its row
  norms, never from dividing by a possibly tiny σ. Accurate for the smallest singular values, which a
  float32 Gram matrix cannot see; on CPU it is also cheaper than a float32 full SVD.
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
KRYLOV_EXTRA = 8  # Krylov block size r + KRYLOV_EXTRA: a cluster straddling σ_r still converges
# flop model, in matrix-product flops: float32 eigh of an s×s matrix ≈ EIGH_COST·s³, SVD of a d×n block
# ≈ SVD_COST·d²·n, plus a fixed cost per Krylov step (small LAPACK calls, Python); measured on 2 CPU cores
EIGH_COST, SVD_COST, STEP_OVERHEAD = 12, 30, 3e8
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
    method: str = ""  # what found them: "krylov", "gram32" (float32 Gram), "gram64" (float64 Gram), "randomized"
    iterations: int = 0  # block Krylov steps taken (also when they were abandoned for the Gram method)


def generator_for(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, module name), so each module's draw is independent of run order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def triplets(
    W: torch.Tensor,
    r: int,
    role: str,
    *,
    mode: str = "exact",
    niter: int = 4,
    oversample: int = 8,
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
    found, noise, steps = None, math.sqrt(max(W.shape) * EPS64), 0  # float32 paths: above their products' rounding
    if role == PRINCIPAL and mode == "randomized":
        found, method = _randomized(W.to(torch.float32), r, niter, oversample, generator), "randomized"
    elif role == PRINCIPAL:
        found, method, steps = _exact_principal(W, r, generator)
    if found is None:
        found, noise, method = _gram(W.to(torch.float64), r, largest=role == PRINCIPAL), GRAM_NOISE, "gram64"
    U, S, Vh, smax = found
    U, S, Vh = U.double(), S.double(), Vh.double()
    U, S, Vh, deficient = _complete(U, S, Vh, max(smax, torch.finfo(torch.float64).tiny) * noise, generator)
    energy = float(S.square().sum()) / fro2 if fro2 > 0 else 0.0
    return Triplets(U, S, Vh, smax, min(energy, 1.0), deficient, method, steps)


def _smaller_gram(W: torch.Tensor):
    """Whether the smaller side is the left one, and the eigendecomposition (ascending) of its Gram matrix."""
    left = W.shape[0] <= W.shape[1]
    evals, evecs = torch.linalg.eigh(W @ W.T if left else W.T @ W)
    return left, evals, evecs


def _gram(W: torch.Tensor, r: int, largest: bool):
    left, evals, evecs = _smaller_gram(W)
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


def _exact_principal(W: torch.Tensor, r: int, gen: torch.Generator | None):
    """(U, S, Vh, σ_max) or None when the float64 check fails, the method that gave the basis, Krylov steps."""
    W32 = W.to(torch.float32)
    k = min(r + KRYLOV_EXTRA, min(W.shape))
    basis, steps = _krylov(W32, r, k, gen)
    method = "krylov" if basis is not None else "gram32"
    if basis is None:
        left, _, evecs = _smaller_gram(W32)
        basis = evecs[:, -k:] if left else W32 @ evecs[:, -k:]  # spans the top k left singular vectors
    return _refine(basis, W, r), method, steps


def _krylov(W: torch.Tensor, r: int, b: int, gen: torch.Generator | None):
    """Top b Ritz vectors of a float32 block Krylov space once the top r have converged, and the steps taken;
    None instead of the vectors when the float32 Gram method is (or is predicted to become) cheaper."""
    m, n = W.shape
    if 2 * b > min(m, n) or _gram32_cost(m, n) < 3 * _step_cost(m, n, b, 2 * b, r):
        return None, 0
    blocks = [torch.linalg.qr(W @ torch.randn(n, b, generator=gen, dtype=W.dtype, device=W.device)).Q]
    rows, history = [blocks[0].T @ W], []  # rows: Kᵀ W, a block at a time
    for step in range(1, min(m, n) // b):
        K = torch.cat(blocks, 1)
        Z = W @ rows[-1].T  # W Wᵀ Q, with Wᵀ Q as (Qᵀ W)ᵀ: twice as fast on CPU (MKL)
        for _ in range(2):  # block Gram–Schmidt against the basis, twice for float32 orthogonality
            Z = Z - K @ (K.T @ Z)
        blocks.append(torch.linalg.qr(Z).Q)
        rows.append(blocks[-1].T @ W)
        Ub, S, Vh = torch.linalg.svd(torch.cat(rows), full_matrices=False)
        U = torch.cat(blocks, 1) @ Ub[:, :b]
        residual = (W @ Vh[:r].T - U[:, :r] * S[:r]).norm(dim=0).max()
        if residual <= EXACT_TOL * S[0]:
            return U, step
        history.append(float(residual / S[0]))
        if not _worth_continuing(history, m, n, b, (step + 1) * b, r):
            return None, step
    return None, step


def _worth_continuing(history: list[float], m: int, n: int, b: int, d: int, r: int) -> bool:
    """Whether the Krylov steps that the last two residuals' rate predicts cost less than the float32 Gram."""
    if len(history) < 2:
        return True
    rate = history[-1] / history[-2]
    if not rate < 1:
        return False
    steps = math.ceil(math.log(EXACT_TOL / history[-1]) / math.log(rate))
    if d + steps * b > min(m, n):
        return False
    return sum(_step_cost(m, n, b, d + i * b, r) for i in range(1, steps + 1)) < _gram32_cost(m, n)


def _gram32_cost(m: int, n: int) -> float:
    s, big = sorted((m, n))
    return 2 * s * s * big + EIGH_COST * s**3


def _step_cost(m: int, n: int, b: int, d: int, r: int) -> float:
    """One Krylov step ending at basis size d: products with W, reorthogonalisation, Rayleigh–Ritz, residual."""
    return 4 * m * n * b + 4 * m * d * b + SVD_COST * d * d * n + 2 * m * n * r + STEP_OVERHEAD


def _refine(basis: torch.Tensor, W: torch.Tensor, r: int):
    """Float64 Rayleigh–Ritz on span(basis), W upcast a row block at a time; None unless every residual
    ||W v − σ u|| is at most EXACT_TOL · σ_max in float64."""
    Q = torch.linalg.qr(basis.double()).Q
    Ub, S, Vh = torch.linalg.svd(sum(Q[i].T @ Wi for i, Wi in _row_blocks(W)), full_matrices=False)
    U, S, Vh = Q @ Ub[:, :r], S[:r], Vh[:r]
    residual2 = sum((Wi @ Vh.T - U[i] * S).square().sum(dim=0) for i, Wi in _row_blocks(W))
    if float(residual2.max().sqrt()) > EXACT_TOL * float(S[0]):
        return None
    return U, S, Vh, float(S[0])


def _row_blocks(W: torch.Tensor):
    """(row slice, float64 copy of those rows) in blocks of about 4 MiB."""
    rows = max(1, (4 << 20) // (8 * W.shape[1]))
    for i in range(0, W.shape[0], rows):
        yield slice(i, i + rows), W[i : i + rows].double()


def _complete(U, S, Vh, floor: float, gen: torch.Generator | None):
    """Replace directions with σ ≤ `floor` (numerically zero) by an orthonormal completion with σ = floor.

    The floor is the noise level of the method that found S. Float64 Gram method: √eps64·σ_max (1.5e-8),
    where σ² falls under the rounding of the Gram matrix. Exact null directions (duplicated rows, zero
    columns, float64 low-rank products) come out of it at 1e-16 to 1e-12·σ_max, while genuine singular
    values of square matrices go down to about 5e-7·σ_max at 8192² (bench_svd's spectrum): a floor of
    √(n·eps64)·σ_max, the worst-case bound on forming the Gram matrix (1.3e-6 at n = 8192), took those
    for zero. Float32 paths (randomized, Krylov, float32 Gram): √(n·eps64)·σ_max, above the rounding of
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
