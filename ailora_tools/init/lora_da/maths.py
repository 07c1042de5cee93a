"""LoRA-DA initial factors (arXiv 2510.24561) from calibration statistics: pure math, one module at a time.

Per target W [out, in], from `calibration`: G = ∂L/∂W [out, in], the output factor y = E[g²] [out] and
the input factor Z = E[x xᵀ] [in, in]. As the authors' `lora_da.py` computes it, with the paper's
[in, out] orientation for the update (torch stores W as [out, in]):

    Z_λ = (Z + Zᵀ)/2 + λI, Cholesky-factored (λ = damping, also added to y)
    D = −Z_λ⁻¹ Gᵀ diag(1 / (y + λ))                 [in, out], the natural-gradient target ΔW
    σ = σ_max(D);  D ← D / σ
    Ω = sym(−α D Dᵀ + β c Z_λ⁻¹),  c = Σ_j 1/(y_j + λ) / (population_size · σ²)      [in, in]
    a = the r eigenvectors of Ω with the smallest eigenvalues, ascending, each signed so that its
        largest-magnitude entry is positive
    A0 = aᵀ / √γ  [r, in],   B0 = Dᵀ a / √γ  [out, r]

so B0 A0 = Dᵀ a aᵀ / γ: the normalised natural-gradient step −diag(1/(y+λ)) G Z_λ⁻¹ / σ, restricted to
the kept input directions, divided by γ. The defaults are the paper's run (the authors'
conf/lora_da.yaml): α = 1, β = 0.03, γ = 1024 (`stable_gamma`), λ = 1e-6; `population_size` is the
size of the training set (their `len(train_set)`), which only the caller knows.

Offsetting the base: the authors' code puts the adapter on the unchanged base (their `reinit_lora`
skips the offset for LoRA-DA, as for LoRA-One), so their model starts at W + s·B0A0, a step of spectral
norm at most s/γ along the natural gradient; their evaluation merges before scoring. A0 and B0 do not
depend on the LoRA scale s, so a caller can write the residual W − s·B0A0 like every other method and
start exactly at W, or leave the base as the authors do.

Where we differ from the authors: the Cholesky solve, Z_λ⁻¹, Ω and its eigenvectors in float64 (theirs
float32); an exact eigendecomposition (`eigh`), where they run 10 iterations of seeded LOBPCG with an
eigh fallback, so our A0 is what their LOBPCG converges to; σ_max from the project's converged subspace
iteration (`svd.triplets`, seeded by (seed, name)), where they use `svd_lowrank(q=1, niter=16)`. Their
other switches are left at their defaults (diagonal output factor, no factor balancing, no variance
normalisation, normalisation power 1). Memory: about 6·in²·8 bytes on the device, plus G and D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import NumericsError
from ..svd import generator_for, triplets
from ..targets import PRINCIPAL

#: the paper's run (conf/lora_da.yaml): da_bias_alpha, da_variance_beta, stable_gamma, fisher_damping
ALPHA, BETA, GAMMA, DAMPING = 1.0, 0.03, 1024.0, 1e-6
#: a Cholesky pivot of Z_λ below this fraction of Z's mean diagonal is a direction the data does not determine
WEAK = 1e-5


@dataclass(frozen=True)
class InputFactor:
    """Z_λ = sym(Z) + λI of one input, factored once and shared by the modules that read it (float64)."""

    cholesky: torch.Tensor  # lower-triangular L, L Lᵀ = Z_λ, [in, in]
    inverse: torch.Tensor  # Z_λ⁻¹, [in, in]
    damping: float  # λ
    #: directions the data determines: Cholesky pivots of Z_λ above `WEAK` × Z's mean diagonal (and 10 λ); fewer
    #: than `in` (few, repetitive calibration tokens) means float rounding, not the data, picks the rest
    rank: int | None = None

    @property
    def deficient(self) -> bool:
        return self.rank is not None and self.rank < self.cholesky.shape[0]


@dataclass
class LoraDaFactors:
    """A0 [r, in] and B0 [out, r] (float32, on the CPU) and what a user needs to judge them."""

    a: torch.Tensor
    b: torch.Tensor
    #: gradient_norm ‖G‖_F; sigma_max σ of the natural gradient before normalising; eigenvalue_min, _edge,
    #: _next: Ω's smallest, r-th and (r+1)-th eigenvalues; bias_norm ‖αDDᵀ‖_F and variance_norm ‖βcZ_λ⁻¹‖_F
    #: (after normalising); captured: the fraction of ‖D‖_F² in the kept directions; gamma γ
    diagnostics: dict[str, float]


def factor_input(
    z: torch.Tensor, *, damping: float = DAMPING, device: str | torch.device = "cpu", name: str = "input"
) -> InputFactor:
    """Damp and factor an input second moment Z = E[x xᵀ].

    Args:
        z: [in, in], any float dtype.
        damping: λ added to the diagonal (and, in `lora_da_factors`, to the output factor).
        device: where to compute and keep the factors.
        name: for error messages (e.g. the `input_key` of the statistics).

    Raises:
        NumericsError: Z has NaN/Inf, or Z + λI is not positive definite (raise the damping).

    Example:
        >>> x = torch.randn(100, 8)
        >>> factor_input(x.T @ x / 100).inverse.shape
        torch.Size([8, 8])
    """
    if damping <= 0:
        raise NumericsError(f"damping {damping}: must be positive")
    z = z.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise NumericsError(f"{name}: the input factor Z has NaN or Inf entries; check the calibration run")
    z = (z + z.T) / 2
    scale = float(z.diagonal().mean())
    z.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(z)
    if int(info) != 0:
        raise NumericsError(f"{name}: Z + {damping}·I is not positive definite; raise the damping")
    del z
    rank = int((chol.diagonal().square() > max(WEAK * scale, 10 * damping)).sum())
    return InputFactor(chol, torch.cholesky_inverse(chol), damping, rank)


def lora_da_factors(
    gradient: torch.Tensor,
    output_factor: torch.Tensor,
    input_factor: InputFactor,
    *,
    rank: int,
    population_size: int,
    alpha: float = ALPHA,
    beta: float = BETA,
    gamma: float = GAMMA,
    seed: int = 0,
    name: str = "module",
) -> LoraDaFactors:
    """LoRA-DA's A0 and B0 for one module (see the module docstring for the formula).

    Args:
        gradient: G = ∂L/∂W, [out, in].
        output_factor: y = E[g²], [out].
        input_factor: `factor_input` of the module's Z; computed where its tensors are.
        rank: r, 1 ≤ r < in.
        population_size: number of training samples the adapter will be trained on (the authors' len(train_set)).
        alpha, beta: weights of the bias term (−α D Dᵀ) and the variance term (β c Z_λ⁻¹) of Ω.
        gamma: both factors are divided by √γ.
        seed, name: seed the σ_max iteration by (seed, name), as every seeded draw in this project.

    Returns:
        `LoraDaFactors` with A0 [r, in] and B0 [out, r] in float32.

    Raises:
        NumericsError: bad shapes, rank or hyper-parameters; G or y not finite; a zero natural gradient.

    Example:
        >>> x, g = torch.randn(200, 16), torch.randn(200, 8)
        >>> f = lora_da_factors(g.T @ x / 200, (g * g).mean(0), factor_input(x.T @ x / 200), rank=4,
        ...                     population_size=1000)
        >>> f.a.shape, f.b.shape
        (torch.Size([4, 16]), torch.Size([8, 4]))
    """
    _check_arguments(
        gradient,
        output_factor,
        input_factor,
        rank=rank,
        population_size=population_size,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        name=name,
    )
    dev = input_factor.cholesky.device
    G = gradient.to(device=dev, dtype=torch.float64)
    y = output_factor.to(device=dev, dtype=torch.float64)
    if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(y).all())):
        raise NumericsError(
            f"{name}: the gradient or the output factor has NaN or Inf entries; check the calibration run"
        )
    y_inverse = 1.0 / (y + input_factor.damping)
    D, sigma = _natural_gradient(G, y_inverse, input_factor, seed=seed, name=name)
    c = float(y_inverse.sum()) / population_size / sigma**2
    a, evals, bias_norm = _lowest_directions(D, input_factor, rank=rank, alpha=alpha, beta_c=beta * c)
    projected = D.T @ a  # [out, r]
    root = math.sqrt(gamma)
    diagnostics = {
        "gradient_norm": float(torch.linalg.matrix_norm(G)),
        "sigma_max": sigma,
        "eigenvalue_min": float(evals[0]),
        "eigenvalue_edge": float(evals[rank - 1]),
        "eigenvalue_next": float(evals[rank]),
        "bias_norm": bias_norm,
        "variance_norm": beta * c * float(torch.linalg.matrix_norm(input_factor.inverse)),
        "captured": float(projected.square().sum() / D.square().sum()),
        "gamma": float(gamma),
    }
    return LoraDaFactors(
        (a.T / root).to("cpu", torch.float32).contiguous(),
        (projected / root).to("cpu", torch.float32).contiguous(),
        diagnostics,
    )


def _check_arguments(
    gradient: torch.Tensor,
    output_factor: torch.Tensor,
    input_factor: InputFactor,
    *,
    rank: int,
    population_size: int,
    alpha: float,
    beta: float,
    gamma: float,
    name: str,
) -> None:
    """Shapes that fit together, a rank below the input size, and hyper-parameters in range."""
    n_out, n_in = gradient.shape
    if input_factor.cholesky.shape != (n_in, n_in) or output_factor.shape != (n_out,):
        raise NumericsError(
            f"{name}: G {list(gradient.shape)}, output factor {list(output_factor.shape)} and input "
            f"factor {list(input_factor.cholesky.shape)} do not fit together"
        )
    if not 1 <= rank < n_in:
        raise NumericsError(f"{name}: rank {rank} must be at least 1 and below the input size {n_in}")
    if population_size < 1 or alpha < 0 or beta < 0 or alpha == beta == 0 or gamma <= 0:
        raise NumericsError(
            f"{name}: need population_size ≥ 1, alpha ≥ 0, beta ≥ 0 (not both 0) and gamma > 0; got "
            f"{population_size}, {alpha}, {beta}, {gamma}"
        )


def _natural_gradient(
    G: torch.Tensor, y_inverse: torch.Tensor, input_factor: InputFactor, *, seed: int, name: str
) -> tuple[torch.Tensor, float]:
    """D = −Z_λ⁻¹ Gᵀ diag(y + λ)⁻¹ [in, out], divided by its σ_max; and that σ_max."""
    D = -torch.cholesky_solve(G.T, input_factor.cholesky) * y_inverse[None, :]  # [in, out]
    sigma = triplets(D.T, 1, PRINCIPAL, generator=generator_for(seed, name, G.device)).sigma_max
    if not math.isfinite(sigma) or sigma <= 0:
        raise NumericsError(
            f"{name}: the natural gradient is zero or not finite (σ_max = {sigma}); the calibration "
            "data gives this module no gradient"
        )
    D /= sigma
    return D, sigma


def _lowest_directions(
    D: torch.Tensor, input_factor: InputFactor, *, rank: int, alpha: float, beta_c: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The `rank` eigenvectors of Ω = −α D Dᵀ + β c Z_λ⁻¹ with the smallest eigenvalues [in, r], each signed so that
    its largest entry is positive; all eigenvalues (ascending); ‖α D Dᵀ‖_F."""
    omega = D @ D.T
    omega *= -alpha
    bias_norm = float(torch.linalg.matrix_norm(omega))
    omega.add_(input_factor.inverse, alpha=beta_c)
    omega = (omega + omega.T) / 2
    evals, evecs = torch.linalg.eigh(omega)  # ascending
    del omega
    a = evecs[:, :rank]
    pivot = a.abs().argmax(dim=0)
    a = a * torch.where(a[pivot, torch.arange(rank, device=D.device)] < 0, -1.0, 1.0)[None, :]
    return a, evals, bias_norm
