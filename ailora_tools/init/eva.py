"""EVA (arXiv 2410.07170; PEFT's `init_lora_weights="eva"`): A0 from the principal directions of each target's inputs
on calibration data, B0 = 0, and the ranks redistributed across targets by explained variance.

`prepare` calibrates on `--data` forward only, one layer at a time (`lora_da.calibration`, statistics "centered"):
for each distinct input (q/k/v share theirs), the float64 scatter S = Σ(x − μ)(x − μ)ᵀ over the real tokens of the
samples, and its leading eigenpairs S ≈ V Λ Vᵀ (a dense eigh up to 1024 inputs, above it the exact principal
search of `svd`): V's rows are the right-singular vectors of the centred inputs, which
PEFT's incremental PCA estimates batch by batch, with PEFT's sign (each vector's largest entry positive) and explained
variance ratios λᵢ/tr S. Each target keeps its first round(r·ρ) (`--eva-rho`, PEFT's `rho`); once every layer is
done, the budget r × targets goes to the largest ratios over all targets (each target's list counted once per
target, ties to the earlier target), as PEFT's `_get_rank_distribution`: target m gets rank rₘ ≤ round(r·ρ), A0 its
first rₘ vectors, B0 = 0 (the base is untouched). ρ = 1 keeps r everywhere. A target given rank 0 gets no adapter,
as PEFT drops it. decompose records rₘ ≠ r in `rank_pattern` and α·rₘ/r in `alpha_pattern` (PEFT's
`adjust_scaling_factors`, its default: without rsLoRA the scale α/r stays that of rank r).
"""

from __future__ import annotations

from .method import InitMethod

#: inputs up to this width get a dense eigendecomposition of their scatter (cheap there, and exact)
DENSE_WIDTH = 1024


class EVA(InitMethod):
    name = "eva"
    summary = (
        "data-aware (needs --data): A0 = principal directions of each target's inputs, B0 = 0, ranks "
        "redistributed by explained variance (PEFT's eva)"
    )
    needs_roles = False
    needs_data = True
    needs_weights = False
    offsets_base = False
    subtracts_product = False  # B0 = 0: the start is the model, and convert writes s·B·A at each module's rank

    def prepare(self, ckpt, jobs, settings, **options):
        """`options`: decompose's calibration settings (`lora_da.method.calibrated`); `task`: the decompose
        options (task, columns; `eva_rho`)."""
        from .lora_da.method import calibrated

        rho = float(getattr(options.get("task"), "eva_rho", 2.0))
        top = check_components(jobs, settings.rank, rho)
        population, stats = calibrated(ckpt, jobs, settings, "centered", options)
        found, by_input = {}, {}
        for s in stats:
            if s.input_key not in by_input:  # one eigendecomposition per distinct input
                by_input = {s.input_key: principal_directions(s.input_factor, top, s.tokens, name=s.name)}
            found[s.name] = (*by_input[s.input_key], s.tokens)
        ranks = redistribute({m: ratios for m, (_, ratios, _) in found.items()}, settings.rank * len(found))
        return {m: (V[: ranks[m]].clone(), ranks[m], ratios, tokens) for m, (V, ratios, tokens) in found.items()}

    def factors(self, job, W, settings, *, context=None, generator=None):
        import torch

        A0, rank, ratios, tokens = context[job.module]
        facts = {
            "role": None,
            "rank": rank,
            "explained_variance": float(ratios[:rank].sum()),
            "explained_variance_first": float(ratios[0]),
            "calibration_tokens": tokens,
        }
        return A0.contiguous(), torch.zeros(job.shape[0], rank, dtype=torch.float32), facts


def check_components(jobs, rank: int, rho: float) -> int:
    """round(r·ρ), the directions each target keeps before the redistribution (PEFT's `max_components`).

    Raises:
        OptionError: a target whose input is narrower than that (PEFT's incremental PCA refuses it too).
    """
    from ..errors import OptionError

    top = round(rank * rho)
    narrow = next((j for j in jobs if j.shape[1] < top), None)
    if narrow is not None:
        raise OptionError(
            f"{{eva_rho}} {rho:g}: with {{rank}} {rank}, each target keeps round(r·ρ) = {top} input directions, more "
            f"than {narrow.module}'s input width {narrow.shape[1]}; lower --eva-rho or --rank"
        )
    return top


def principal_directions(scatter, top: int, tokens: int, *, name: str):
    """(V [top, in] float32, ratios [top] float64): the `top` leading eigenvectors of the centred scatter [in, in]
    (float64) with PEFT's signs, and their explained variance ratios λᵢ/tr S.

    Raises:
        FormatError: fewer calibration tokens than `top` (PEFT needs as many rows per step).
        NumericsError: a scatter that is not finite or is zero (inputs all the same).
    """
    import torch

    from ..errors import FormatError, NumericsError

    if tokens < top:
        raise FormatError(
            f"--data: {tokens} calibration tokens reach {name}, fewer than the {top} input directions EVA keeps "
            "(round(r·ρ)); calibrate on more or longer samples (--samples, a larger --data)"
        )
    total = float(scatter.diagonal().sum())
    if not (torch.isfinite(scatter).all() and total > 0):
        raise NumericsError(
            f"{name}: its calibration inputs are constant or not finite (scatter trace {total:.3g}); "
            "calibrate on more and more varied samples"
        )
    values, V = _leading_eigenpairs(scatter, top)
    picked = V.abs().argmax(1)
    V = V * V[torch.arange(top), picked].sign()[:, None]  # PEFT's svd_flip: each row's largest entry positive
    return V.float(), values / total


def _leading_eigenpairs(scatter, top: int):
    """(λ [top] descending, V [top, in]) of the symmetric PSD scatter: a dense float64 `eigh` up to DENSE_WIDTH
    inputs, above it the exact principal-triplet search of `svd` (block Krylov, residuals ≤ 1e-5·λ₁, float64
    Rayleigh–Ritz), whose cost and memory follow `top`, not in³ (an 8192-wide input: seconds, not minutes, and no
    [in, in] eigenvector matrix or eigh workspace beside the scatter)."""
    import torch

    from .svd import triplets
    from .targets import PRINCIPAL

    if scatter.shape[0] <= DENSE_WIDTH or 2 * top >= scatter.shape[0]:
        values, vectors = torch.linalg.eigh(scatter)
        return values[-top:].flip(0).clamp(min=0), vectors[:, -top:].flip(1).T  # descending, no full copy
    g = torch.Generator(device=scatter.device).manual_seed(0)
    t = triplets(scatter, top, PRINCIPAL, generator=g)
    return t.S.clamp(min=0), t.Vh


def redistribute(ratios: dict, budget: int) -> dict[str, int]:
    """Each target's rank: how many of the `budget` largest explained variance ratios over all targets (each
    target's own list, in target order, ties to the earlier) are its own (PEFT's `_get_rank_distribution`)."""
    import torch

    names = list(ratios)
    owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(ratios.values())])
    order = torch.cat(list(ratios.values())).argsort(descending=True, stable=True)
    counts = torch.bincount(owner[order[:budget]], minlength=len(names))
    return {m: int(c) for m, c in zip(names, counts)}
