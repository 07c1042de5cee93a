"""LoRA-DA (arXiv 2510.24561): data-aware initial factors from calibration samples of the target data.

`prepare` runs the calibration (`calibration`: one decoder or encoder layer at a time, never the whole model) on the
first `samples` rows of `--data`, read as `train` reads them for the task (`--task`, the column options; masked-LM masks
and a new classification head drawn from `--seed`, as `train --seed` draws them), and turns each module's statistics
into (A0, B0) as soon as its layer is done (`maths`), so only one layer's statistics are held at a time. `factors` then
hands each module its pair; decompose writes the residual W − s·B0·A0 as for every other method, so training starts
exactly at the pretrained model. The authors leave the base as it is and start at W + s·B0·A0: that is `--no-offset`
(the same factors; the adapter then applies to the original model, as a plain LoRA does); `--no-residual` with exact
training keeps the original weights and still starts at W.
"""

from __future__ import annotations

from ..method import CalibratedFactors


class LoRADA(CalibratedFactors):
    name = "lora-da"
    summary = "data-aware (needs --data): A0 from the natural gradient's guidance matrix"

    def prepare(self, ckpt, jobs, settings, **options):
        """`options`: data, samples (64), max_length (512), task (the `options.TaskOptions` the calibration samples
        are read for), device ("auto"), progress (True); see `calibrated`."""
        device, samples = options.get("device", "auto"), options.get("samples", 64)
        population, stats = calibrated(ckpt, jobs, settings, "lora-da", options)
        factors, inputs = {}, {}
        for s in stats:
            if s.input_key not in inputs:  # q/k/v read the same input: factor Z once
                inputs = {s.input_key: _input_factor(s, device, samples)}
            factors[s.name] = _module_factors(
                s, inputs[s.input_key], rank=settings.rank, population=population, seed=settings.seed
            )
        return factors


def _input_factor(stats, device: str, samples: int):
    """The module's Z factored (`_factor`) where the factors are computed; a warning when it is rank-deficient."""
    factor = _factor(stats.input_factor, _device(device), stats.name)
    if factor.deficient:
        _warn_deficient(stats, factor, samples)
    return factor


def _module_factors(stats, input_factor, *, rank: int, population: int, seed: int) -> tuple:
    """(A0, B0, the module's record) from its calibration statistics."""
    from .maths import lora_da_factors

    f = lora_da_factors(
        stats.gradient,
        stats.output_factor,
        input_factor,
        rank=rank,
        population_size=population,
        seed=seed,
        name=stats.name,
    )
    return (
        f.a,
        f.b,
        {
            "role": None,
            **f.diagnostics,
            "damping": input_factor.damping,
            "input_rank": input_factor.rank,
            "calibration_loss": stats.loss,
            "calibration_tokens": stats.tokens,
        },
    )


def calibrated(ckpt, jobs, settings, statistics: str, options: dict):
    """(rows in `--data`, an iterator of each job's `statistics` as `calibration.calibrate` sums them) on its first
    `samples` rows, read for `task` (`options.TaskOptions`): the calibration of every data-aware method (LoRA-DA,
    CorDA, LoRA-GA, EVA), from the keyword options decompose hands a method's `prepare` (data, samples, max_length,
    task, device, progress; these defaults where absent). Everything is checked before this returns."""
    from ...options import TaskOptions
    from .calibration import calibrate, check_supported
    from .masks import require_transformers

    get = {"data": None, "samples": 64, "max_length": 512, "task": None, "device": "auto", "progress": True}
    o = {k: options.get(k, d) for k, d in get.items()}
    require_transformers()  # before the data is read
    task = o["task"] or TaskOptions()
    name = check_supported(ckpt, task.task)
    population, examples, labels = calibration_samples(
        ckpt, o["data"], name, task, o["samples"], o["max_length"], seed=settings.seed
    )
    return population, calibrate(
        ckpt,
        examples,
        [j.module for j in jobs],
        task=name,
        labels=labels,
        seed=settings.seed,
        device=o["device"],
        progress=o["progress"],
        statistics=statistics,
    )


def calibration_samples(ckpt, data, task: str, options, samples: int, max_length: int, *, seed: int):
    """(rows in `data`, its first `samples` rows tokenized for `task` as `train` reads them, the classification head's
    config keys or None). Masked-LM rows are masked with train's seeded draw (`seed`: the same masks as `train
    --seed` gives its first rows); classification labels get train's ids from these rows.

    Raises:
        FormatError: fewer rows than `samples`, a bad row, or a causal-LM or masked-LM sample longer than `max_length`
            (not cut: that could drop the tokens its loss is on; classification text is cut at `max_length`, as
            `train` cuts it, so `compare --max-length` holds for LoRA-DA's calibration too).
    """
    from ...architectures import CLASSIFY, MASKED_LM
    from ...errors import FormatError
    from ...io.examples import check_rows, load_jsonl, load_masked_jsonl
    from ...io.labels import label_ids, read_labeled, tokenize_labeled
    from ...io.tokenizer import load_tokenizer

    regression = options.num_labels == 1
    population = check_rows(data, flag="--data", task=task, columns=options.columns, regression=regression)
    if population < samples:
        raise FormatError(
            f"--data {data}: {population} rows, fewer than --samples {samples}; give more rows or "
            f"pass --samples {population}"
        )
    tokenizer, _ = load_tokenizer(ckpt.root, flag="MODEL")
    labels = None
    if task == CLASSIFY:
        rows = read_labeled(data, columns=options.columns, regression=regression)
        ids, labels = label_ids(
            rows, [], data=data, eval_data=None, config=ckpt.config, base=ckpt.source, num_labels=options.num_labels
        )  # from every row, as train (less its --eval-data)
        examples = tokenize_labeled(rows[:samples], tokenizer, ids, max_length=max_length)  # cut as train cuts
    elif task == MASKED_LM:
        examples = load_masked_jsonl(data, tokenizer, max_length=1 << 30, seed=seed, columns=options.columns)[:samples]
    else:
        examples = load_jsonl(data, tokenizer, max_length=1 << 30, limit=samples, columns=options.columns)
    for i, ex in enumerate(examples, 1):  # token-level losses: cutting could drop every token a sample's loss is on
        if len(ex.input_ids) > max_length:
            raise FormatError(
                f"--data {data}: sample {i} has {len(ex.input_ids)} tokens, more than --max-length "
                f"{max_length}; raise --max-length or shorten it (calibration does not cut samples)"
            )
    return population, examples, labels


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

    warnings.warn(
        AiloraWarning(
            f"LoRA-DA: the input statistics of {stats.name} have rank {z.rank} of {z.cholesky.shape[0]} (from "
            f"{stats.tokens} calibration tokens of {samples} samples): float rounding, not the data, decides part of "
            "its A0, which can then differ between devices and dtypes; calibrate on more and more varied samples "
            "(--samples, a larger --data)"
        ),
        stacklevel=2,
    )


def _device(device: str):
    from ...devices import resolve_device

    return resolve_device(device)
