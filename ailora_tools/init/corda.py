"""CorDA (arXiv 2406.05223; PEFT's `init_lora_weights="corda"`): initial factors from the SVD of W·C, C the covariance
of W's inputs on calibration data.

`prepare` calibrates on `--data` forward only, one layer at a time (`lora_da.calibration`, statistics "covariance"):
C is PEFT's, the mean over samples of X̂ᵀX̂ with X̂ a sample's inputs divided by |max(X)|. For each module, as its layer
is done: C + λI with λ = 0.01·mean(diag C), doubled while ‖(C + λI)(C + λI)⁻¹ − I‖_F ≥ 0.05 (PEFT's test);
W(C + λI) = U Σ Vᵀ; V̂ = (Vᵀ(C + λI)⁻¹)ᵀ; IPM (`--corda-mode ipm`, the default) keeps the r largest directions, KPM
(`kpm`) the r smallest; A0 = √(Σ/s)·V̂ᵀ, B0 = U·√(Σ/s). Only one input's C is held at a time, and only the factors are
kept. The residual W − s·B0·A0 replaces W, as PEFT's init rewrites the base. Computed in float64 (PEFT: float32).
"""

from __future__ import annotations

from .method import CalibratedFactors

MODES = ("ipm", "kpm")
#: PEFT's starting damping (× mean(diag C)) and inverse check; the doubling stops here
DAMPING, INVERSE_ERROR, MAX_DAMPING = 0.01, 0.05, 1e6


class CorDA(CalibratedFactors):
    name = "corda"
    summary = "data-aware (needs --data): A0, B0 from the SVD of W·C, C the input covariance (PEFT's corda)"

    def prepare(self, ckpt, jobs, settings, **options):
        """`options`: decompose's calibration settings (`lora_da.method.calibrated`); `task`: the decompose
        options (task, columns; `corda_mode`)."""
        from ..io.tensorio import read_tensor
        from .lora_da.method import calibrated

        mode = getattr(options.get("task"), "corda_mode", "ipm")
        population, stats = calibrated(ckpt, jobs, settings, "covariance", options)
        by_name, found = {j.module: j for j in jobs}, {}
        for s in stats:
            job = by_name[s.name]
            W = read_tensor(ckpt.shard(job.tensor.file), job.tensor.name)
            A0, B0, facts = corda_factors(
                W.T if job.transposed else W, s.input_factor, settings.rank, settings.scale, mode, name=s.name
            )
            found[s.name] = (A0, B0, {"role": None, "mode": mode, **facts, "calibration_tokens": s.tokens})
        return found


def corda_factors(W, C, rank: int, scale: float, mode: str, *, name: str):
    """(A0 [r, in], B0 [out, r] float32, facts) of W [out, in] from its input covariance C [in, in].

    Raises:
        NumericsError: C or W not finite, or C + λI not invertible up to PEFT's test at any λ.
    """
    import torch

    from ..errors import NumericsError

    # [in, in] float64 at once: C + λI, its inverse and their product (the diagonal added in place, no identity held)
    W, mean, damping = W.double(), float(C.diagonal().double().mean()), DAMPING
    while True:
        fixed = C.double()
        fixed.diagonal().add_(mean * damping)
        inverse = torch.linalg.inv_ex(fixed).inverse
        check = fixed @ inverse
        check.diagonal().sub_(1)
        error = float(torch.linalg.vector_norm(check))
        del check
        if error < INVERSE_ERROR:
            break
        if not error == error or damping > MAX_DAMPING or not mean > 0:  # NaN, or no λ helps
            raise NumericsError(
                f"{name}: its input covariance is not invertible (mean diagonal {mean:.3g}); "
                "calibrate on more and more varied samples (--samples, a larger --data)"
            )
        damping *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    keep = slice(0, rank) if mode == "ipm" else slice(S.shape[0] - rank, S.shape[0])
    root = (S[keep] / scale).sqrt()
    A0 = root[:, None] * (Vh[keep] @ inverse)
    B0 = U[:, keep] * root
    if not bool(torch.isfinite(A0).all() and torch.isfinite(B0).all()):
        raise NumericsError(f"{name}: CorDA's factors hold NaN or Inf; check the weights and the calibration data")
    facts = {"damping": damping, "sigma_max": float(S[0]), "sigma_edge": float(S[keep][-1 if mode == "ipm" else 0])}
    return A0.float().contiguous(), B0.float().contiguous(), facts
