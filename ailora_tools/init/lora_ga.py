"""LoRA-GA (arXiv 2407.05000; PEFT's `init_lora_weights="lora_ga"`): initial factors from the SVD of the loss gradient.

`prepare` calibrates on `--data` as LoRA-DA does (one layer at a time, never the whole model: `lora_da.calibration`)
with hooks that sum only G = ∂L/∂W averaged over the samples, which is PEFT's `preprocess_loraga` with one sample per
train step, and keeps each G's 2r leading singular triplets. `factors` shares them out as PEFT's `lora_ga_init` does:
with G ≈ U Σ Vᵀ, direction ArB2r (PEFT's default) gives A0 = Vᵀ[:r] and B0 = U[:, r:2r]·Σ[r:2r]; A2rBr A0 from r..2r
and B0 from 0..r; ArBr odd and even indices; random r of the 2r (drawn per module from (seed, name), where PEFT's draw
is unseeded). Scale stable multiplies B0 by out^¼/√γ; weight_svd by σ_max(W)/σ of B0's first direction; gd_scale
divides both by s; unit leaves them. The residual W − s·B0·A0 replaces W, as PEFT's init rewrites the base.
"""

from __future__ import annotations

from .method import InitMethod

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


class LoRAGA(InitMethod):
    name = "lora-ga"
    summary = "data-aware (needs --data): A0, B0 from the SVD of the loss gradient (PEFT's lora_ga)"
    needs_roles = False
    needs_data = True

    def prepare(self, ckpt, jobs, settings, **options):
        """`options`: decompose's calibration settings (`lora_da.method.calibrated`); `task`: the decompose
        options (task, columns; `ga_direction`, `ga_scale`, `ga_gamma`)."""
        from ..errors import OptionError
        from .lora_da.method import calibrated
        from .svd import Triplets, generator_for, triplets
        from .targets import PRINCIPAL

        small = next((j for j in jobs if 2 * settings.rank >= min(j.shape)), None)
        if small is not None:
            raise OptionError(
                f"{{rank}} {settings.rank}: lora-ga takes 2r = {2 * settings.rank} singular directions "
                f"of the gradient, not below {small.module}'s {min(small.shape)}; lower --rank"
            )
        population, stats = calibrated(ckpt, jobs, settings, "gradient", options)
        found = {}
        for s in stats:
            t = triplets(
                s.gradient,
                2 * settings.rank,
                PRINCIPAL,
                mode=settings.svd,
                niter=settings.niter,
                oversample=settings.oversample,
                generator=generator_for(settings.seed, s.name, "cpu"),
            )
            # copies: the triplets may be views into a full-width decomposition, which they would keep alive
            t = Triplets(t.U.clone(), t.S.clone(), t.Vh.clone(), t.sigma_max, t.energy_fraction, t.deficient)
            found[s.name] = (
                t,
                {"gradient_norm": float(s.gradient.norm()), "calibration_tokens": s.tokens, "calibration_loss": s.loss},
            )
        return found, options_of(options.get("task"))

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        found, (direction, scale, gamma) = context
        t, stats = found[job.module]
        r = settings.rank
        a, b = {
            "ArB2r": (slice(0, r), slice(r, 2 * r)),
            "A2rBr": (slice(r, 2 * r), slice(0, r)),
            "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
        }.get(direction, (None, None))
        if a is None:  # random: the same r of the 2r directions for both
            a = b = torch.randperm(2 * r, generator=torch.Generator().manual_seed(generator.initial_seed()))[:r]
        A0, B0 = t.Vh[a], t.U[:, b] * t.S[b]
        if scale == "stable":
            B0 = B0 * (job.shape[0] ** 0.25 / gamma**0.5)
        elif scale == "weight_svd" and float(t.S[b][0]) > 0:
            B0 = B0 * (float(torch.linalg.matrix_norm(W.double(), 2)) / float(t.S[b][0]))
        elif scale == "gd_scale":
            A0, B0 = A0 / settings.scale, B0 / settings.scale
        return (
            A0.float().contiguous(),
            B0.float().contiguous(),
            {
                "role": None,
                "direction": direction,
                "scale": scale,
                "sigma_max": t.sigma_max,
                "sigma_edge": float(t.S[-1]),
                **stats,
            },
        )


def options_of(options) -> tuple[str, str, float]:
    """(direction, scale, γ) from the decompose options (PEFT's defaults when they do not say)."""
    return (
        getattr(options, "ga_direction", "ArB2r"),
        getattr(options, "ga_scale", "stable"),
        float(getattr(options, "ga_gamma", 16)),
    )
