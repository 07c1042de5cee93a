"""OLoRA (arXiv 2406.01775), as PEFT's `init_lora_weights="olora"`: Q, R = qr(W), B0 = Q[:, :r], A0 = R[:r], and the
base becomes the residual W − s·B0·A0 (as PiSSA's), so step 0 reproduces the model.

Householder QR reflects W column by column, so Q[:, :r] and R[:r, :r] depend on W's first r columns only: they come
from the QR of W[:, :r], and the rest of R[:r] is Q_rᵀ·W. Cost O(out·in·r) instead of a full QR, with the signs of
PEFT's full QR (LAPACK's reflectors give each diagonal entry of R the opposite sign of its pivot). PEFT factors the
weight as stored, so on Conv1D (GPT-2) its B0 has W's [in, out] layout; ours factors [out, in] for every layer.
"""

from __future__ import annotations

from .method import InitMethod


class OLoRA(InitMethod):
    name = "olora"
    summary = "W's QR: B0 = Q[:, :r], A0 = R[:r], residual W − s·B0·A0 (PEFT's olora)"
    needs_roles = False

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        r = settings.rank
        Q, R = torch.linalg.qr(W[:, :r])
        A0 = Q.T @ W
        A0[:, :r] = R  # exactly triangular, as PEFT's R[:r]
        kept = float(torch.linalg.vector_norm(A0)) ** 2  # ‖Q_r·A0‖ = ‖A0‖: Q_r has orthonormal columns
        total = float(torch.linalg.vector_norm(W)) ** 2
        stats = {"role": None, "energy_fraction": min(kept / total, 1.0) if total > 0 else 0.0}
        return A0.to(torch.float32).contiguous(), Q.to(torch.float32).contiguous(), stats
