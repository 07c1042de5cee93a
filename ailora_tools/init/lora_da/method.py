"""LoRA-DA (arXiv 2510.24561): data-aware initial factors from calibration samples of the target data.

`prepare` runs the calibration (`ailora_tools.calibration`: one decoder layer at a time, never the whole
model) on the first `samples` rows of `--data`, and turns each module's statistics into (A0, B0) as soon as
its layer is done (`ailora_tools.lora_da`), so only one layer's statistics are held at a time. `factors`
then hands each module its pair; decompose writes the residual W − s·B0·A0 as for every other method, so
training starts exactly at the pretrained model (the authors leave the base as it is and start at
W + s·B0·A0; `--no-residual` with exact training is the closest to theirs that still starts at W).
"""
from __future__ import annotations

from ..method import InitMethod


class LoRADA(InitMethod):
    name = "lora-da"
    summary = "data-aware (needs --data): A0 from the natural gradient's guidance matrix"
    needs_roles = False
    needs_data = True
    needs_weights = False

    def prepare(self, ckpt, jobs, settings, *, data=None, samples: int = 64, max_length: int = 512,
                device: str = "auto", progress: bool = True, **_):
        from ...errors import FormatError
        from ...io.examples import check_rows, load_jsonl
        from ...io.tokenizer import load_tokenizer
        from .calibration import calibrate, require_transformers
        from .maths import lora_da_factors

        require_transformers()  # before the data is read
        population = check_rows(data, flag="--data")
        if population < samples:
            raise FormatError(f"--data {data}: {population} rows, fewer than --samples {samples}; give more rows or "
                              f"pass --samples {population}")
        tokenizer, _ = load_tokenizer(ckpt.root, flag="MODEL")
        examples = load_jsonl(data, tokenizer, max_length=1 << 30, limit=samples)
        for i, ex in enumerate(examples, 1):
            if len(ex.input_ids) > max_length:
                raise FormatError(f"--data {data}: sample {i} has {len(ex.input_ids)} tokens, more than --max-length "
                                  f"{max_length}; raise --max-length or shorten it (calibration does not cut samples)")
        factors, inputs = {}, {}
        for stats in calibrate(ckpt, examples, [j.module for j in jobs], device=device, progress=progress):
            if stats.input_key not in inputs:  # q/k/v read the same input: factor Z once
                inputs = {stats.input_key: _factor(stats.input_factor, _device(device), stats.name)}
                if inputs[stats.input_key].deficient:
                    _warn_deficient(stats, inputs[stats.input_key], samples)
            f = lora_da_factors(stats.gradient, stats.output_factor, inputs[stats.input_key], rank=settings.rank,
                                population_size=population, seed=settings.seed, name=stats.name)
            factors[stats.name] = (f.a, f.b, {"role": None, **f.diagnostics, "damping": inputs[stats.input_key].damping,
                                              "input_rank": inputs[stats.input_key].rank,
                                              "calibration_loss": stats.loss, "calibration_tokens": stats.tokens})
        return factors

    def factors(self, job, W, settings, *, context=None, generator=None):
        return context[job.module]


def _factor(z, device, name: str):
    """Z + λI factored, λ from the authors' 1e-6 raised tenfold while Z + λI is not positive definite (a Z of
    low rank, from few distinct calibration tokens, has float32 rounding above 1e-6), up to 1% of Z's mean
    diagonal; the manifest records the λ used."""
    from ...errors import NumericsError
    from .maths import DAMPING, factor_input

    damping, limit = DAMPING, 1e-2 * float(z.diagonal().double().mean())
    while True:
        try:
            return factor_input(z, damping=damping, device=device, name=name)
        except NumericsError:
            if damping * 10 > max(limit, DAMPING):
                raise
            damping *= 10


def _warn_deficient(stats, z, samples: int) -> None:
    """Say that the calibration data leaves some input directions undetermined, and what to do."""
    import warnings

    from ...errors import AiloraWarning

    warnings.warn(AiloraWarning(
        f"LoRA-DA: the input statistics of {stats.name} have rank {z.rank} of {z.cholesky.shape[0]} (from "
        f"{stats.tokens} calibration tokens of {samples} samples): float rounding, not the data, decides part of "
        "its A0, which can then differ between devices and dtypes; calibrate on more and more varied samples "
        "(--samples, a larger --data)"), stacklevel=2)


def _device(device: str):
    from ...devices import resolve_device

    return resolve_device(device)
