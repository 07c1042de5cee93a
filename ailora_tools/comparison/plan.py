"""What a comparison will run, checked before any run starts: the options every run shares, the methods, the metric
that chooses the rates, and every run (method × progressive × rate × seed)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..errors import OptionError
from ..init import METHODS, Settings
from ..init.lora_da.calibration import TASKS as CALIBRATED
from ..init.targets import architecture, assign_roles, linear_modules
from ..io.checkpoint import Checkpoint
from ..io.examples import check_data
from ..io.fingerprints import fingerprints
from ..lineage import input_digest
from ..options import CLASSIFICATION, METRICS, REGRESSION, InitOptions, TrainOptions, check
from ..training.bitfit import check_bitfit
from ..training.tasks import resolve_task
from .search import SearchSpec, first_grid
from .statistics import INTERVALS
from .sweeps import BITFIT, DEFAULT_METHODS, DORA, init_of, parse_lrs, parse_seeds

#: `--lr auto`
AUTO = "auto"
#: calibration samples for data-aware methods: the first rows of the training data
CALIBRATION_SAMPLES = 64


@dataclass(frozen=True)
class Run:
    """One run: a compare method, its progressive K (None: plain training), learning rate, seed (None: `seed`) and,
    for a search run, its steps (None: the comparison's)."""

    method: str
    progressive: int | None
    lr: float
    seed: int | None
    steps: int | None = None


@dataclass(frozen=True)
class ReportSpec:
    """What `compare` runs besides the methods and reports: each method also with progressive training (K), the
    training loss's smoothing, the metric that chooses rates, the targets of "steps to reach", the baseline and the
    interval of the differences (`compare`'s settings of these names)."""

    progressive: int | None = None
    smooth: int = 10
    metric: str = "auto"
    target_loss: float | None = None
    target_metric: float | None = None
    baseline: str | None = None
    interval: str = "t"

    @classmethod
    def take(cls, settings: dict) -> ReportSpec:
        """The spec `settings` give, those keys removed from `settings`; its numbers and choices checked."""
        spec = cls(**{name: settings.pop(name) for name in cls.__dataclass_fields__ if name in settings})
        check("--progressive", spec.progressive, low=1)
        check("--smooth", spec.smooth, low=1)
        check("--metric", spec.metric, choices=METRICS)
        return spec


@dataclass(frozen=True)
class ComparePlan:
    """A comparison, validated: what every run shares and the runs, in order."""

    model: str | os.PathLike
    data: str | os.PathLike
    revision: str | None
    ckpt: Checkpoint
    init: InitOptions  # its `method` is replaced by each run's
    training: TrainOptions
    methods: list[str]
    metric: str
    lrs: dict[str, list[float]]
    seeds: list[int] | None
    #: rows of --data (the data-aware methods calibrate on up to `CALIBRATION_SAMPLES` of them), None if not counted
    data_rows: int | None
    runs: list[Run]
    #: what the manifest records and `--resume` compares
    settings: dict
    #: `--lr auto`'s search (None: the rates given); `runs` are then its first grids
    search: SearchSpec | None = None
    #: the method the others are compared with, and how (`statistics.difference`)
    baseline: str | None = None
    interval: str = "t"
    #: rows of --eval-data, for the binomial standard error of accuracy
    eval_rows: int | None = None
    #: what was asked of the report (`metric` and `baseline` above are its choices resolved)
    report: ReportSpec = ReportSpec()


def plan_comparison(
    model,
    data,
    *,
    methods: list[str] | None,
    seeds,
    init: InitOptions | None,
    training: TrainOptions | None,
    revision: str | None,
    settings: dict,
) -> ComparePlan:
    """The comparison `compare` describes, every input checked (see `compare`'s Raises); `settings` are fields of
    `InitOptions` and `TrainOptions`, `lr` (a rate, a sweep or "auto"), `SearchSpec.take`'s and `ReportSpec`'s."""
    settings = dict(settings)
    spec, asked = SearchSpec.take(settings), ReportSpec.take(settings)
    init_o, train_o, lr_spec = _options(init, training, settings)
    ckpt = Checkpoint.open(model, revision=revision)
    task = resolve_task(train_o.task, ckpt.config)
    methods = _methods(methods, ckpt, task)
    auto = isinstance(lr_spec, str) and lr_spec.strip().lower() == AUTO
    search = _search(spec) if auto else None
    lrs = {m: first_grid(m, search) for m in methods} if auto else parse_lrs(lr_spec, methods, train_o.lr)
    seeds = parse_seeds(seeds)
    baseline = _baseline(asked.baseline, methods, asked.interval)
    metric = _metric(asked.metric, task, train_o.num_labels == 1)
    train_o, rows = _data(data, train_o, task, ckpt, model)
    _check_methods(methods, init_o, ckpt, model)
    _check_calibration(methods, ckpt, data, task, train_o, rows.get("--data"))
    runs = _runs(methods, asked.progressive, lrs, seeds, search)
    recorded = {
        **_recorded(model, data, revision, ckpt, init_o, train_o, seeds, lrs),
        "search": asdict(search) if search else None,
        "baseline": baseline,
        "interval": asked.interval,
    }
    return ComparePlan(
        model,
        data,
        revision,
        ckpt,
        init_o,
        train_o,
        methods,
        metric,
        lrs,
        seeds,
        rows.get("--data"),
        runs,
        recorded,
        search,
        baseline,
        asked.interval,
        rows.get("--eval-data"),
        asked,
    )


def _data(data, train_o: TrainOptions, task, ckpt: Checkpoint, model) -> tuple[TrainOptions, dict]:
    """Every row of --data and --eval-data checked before any run (their row counts), and the training options with
    eval_every defaulting to a tenth of max_steps where there is eval data."""
    rows = check_data(
        task.name,
        data,
        train_o.eval_data,
        columns=train_o.columns,
        num_labels=train_o.num_labels,
        config=ckpt.config,
        base=model,
    )
    if train_o.eval_every is None and train_o.eval_data is not None and train_o.max_steps:
        train_o = TrainOptions.build(train_o, eval_every=max(1, train_o.max_steps // 10))
    return train_o, rows


def _check_methods(methods: list[str], init_o: InitOptions, ckpt: Checkpoint, model) -> None:
    """Every method's roles and rank on this model, and BitFit's bias terms, checked before the first run (an error
    in the last method would surface too late)."""
    names = list(linear_modules(ckpt.tensors))
    for m in (m for m in methods if m != BITFIT):
        assign_roles(
            METHODS[init_of(m)[0]],
            list(init_o.targets),
            names,
            architecture(ckpt.config),
            init_o.roles,
            config=ckpt.config,
        )
        METHODS[init_of(m)[0]].check_settings(Settings(init_o.rank, 1.0))  # (orthogonal: an even rank)
    if BITFIT in methods:  # a model without bias terms (Llama) is refused now, not after the other runs
        check_bitfit(ckpt, base=model, adapter=None, bitfit=True, progressive=None)


def _check_calibration(methods: list[str], ckpt: Checkpoint, data, task, train_o: TrainOptions, rows) -> None:
    """The calibration rows of the data-aware methods (the first `CALIBRATION_SAMPLES` rows of --data, read as
    their decompose reads them) checked before the first run: a causal-LM sample longer than --max-length would
    otherwise stop the comparison at that method's turn."""
    if rows is None or not any(m != BITFIT and METHODS[init_of(m)[0]].needs_data for m in methods):
        return
    from ..init.lora_da.method import calibration_samples

    calibration_samples(ckpt, data, task.name, train_o, min(CALIBRATION_SAMPLES, rows), train_o.max_length, seed=0)


def _runs(
    methods: list[str], progressive: int | None, lrs: dict, seeds: list[int] | None, search: SearchSpec | None
) -> list[Run]:
    """Every run, in order: method (then each with progressive K) × rate × seed; a search tries its grid with the
    first seed only."""
    groups = [(m, None) for m in methods] + ([(m, progressive) for m in methods if m != BITFIT] if progressive else [])
    searched = (seeds or [None])[:1] if search else (seeds or [None])
    return [
        Run(m, k, lr, seed, search.steps if search else None) for m, k in groups for lr in lrs[m] for seed in searched
    ]


def _search(spec: SearchSpec) -> SearchSpec:
    """`--lr auto`'s settings, checked."""
    if not spec.factor > 1.1:
        raise OptionError(f"--lr-factor {spec.factor}: give a factor above 1.1 between rates (2, or 3.162 for √10)")
    if spec.max_rates < 3:
        raise OptionError(f"--lr-max-rates {spec.max_rates}: the first grid alone has 3 rates; give 3 or more")
    if spec.keep < 1:
        raise OptionError(f"--search-keep {spec.keep}: keep at least 1 rate")
    if spec.center is not None and not 0 < spec.center < 1:
        raise OptionError(f"--lr-center {spec.center}: give a rate between 0 and 1")
    if spec.steps is not None and spec.steps < 1:
        raise OptionError(f"--search-steps {spec.steps}: give at least 1 step")
    return spec


def _baseline(baseline: str | None, methods: list[str], interval: str) -> str:
    """The method the others are compared with: `baseline`, or lora when compared, else the first method."""
    if interval not in INTERVALS:
        raise OptionError(f"--interval {interval}: choose {' or '.join(INTERVALS)}")
    if baseline is None:
        return "lora" if "lora" in methods else methods[0]
    if baseline not in methods:
        raise OptionError(f"--baseline {baseline}: not among the compared methods ({', '.join(methods)})")
    return baseline


def _options(init: InitOptions | None, training: TrainOptions | None, settings: dict):
    """(InitOptions, TrainOptions, the `lr` sweep or None): `settings` by name into either; a single rate is a
    TrainOptions field, anything else a sweep (`parse_lrs`)."""
    lr_spec = settings.pop("lr", None)
    if isinstance(lr_spec, (int, float)) and not isinstance(lr_spec, bool):
        settings["lr"], lr_spec = lr_spec, None
    unknown = sorted(set(settings) - set(InitOptions.defaults()) - set(TrainOptions.defaults()))
    if unknown:
        raise OptionError(f"compare has no setting {', '.join(unknown)}")
    init_o = InitOptions.build(init, **{k: v for k, v in settings.items() if k in InitOptions.defaults()})
    train_o = TrainOptions.build(training, **{k: v for k, v in settings.items() if k in TrainOptions.defaults()})
    return init_o, train_o, lr_spec


def _methods(methods: list[str] | None, ckpt: Checkpoint, task) -> list[str]:
    """The compare methods given (default: `DEFAULT_METHODS` this version has, lora-da where it calibrates)."""
    calibrates = ckpt.config.get("model_type") in CALIBRATED.get(task.name, ())  # LoRA-DA, for this model and task
    default = [m for m in DEFAULT_METHODS if m in METHODS and (calibrates or not METHODS[m].needs_data)]
    methods = list(methods) if methods is not None else default
    unknown = [m for m in methods if m != BITFIT and (init_of(m)[0] not in METHODS or "+" in m and not init_of(m)[1])]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise OptionError(
            f"--methods {','.join(methods)}: give each once, from {', '.join([*METHODS, BITFIT, DORA])} "
            "(METHOD+dora for an init with DoRA)"
        )
    calibrating = [m for m in methods if m != BITFIT and METHODS[init_of(m)[0]].needs_data]
    if calibrating and not calibrates:
        raise OptionError(
            f"--methods {','.join(calibrating)}: LoRA-DA does not calibrate a "
            f"{ckpt.config.get('model_type')} model for --task {task.name} (it calibrates "
            + "; ".join(f"{', '.join(types)} for {t}" for t, types in CALIBRATED.items())
            + "); leave it out"
        )
    return methods


def _metric(metric: str, task, regression: bool) -> str:
    """The metric "auto" means for the task (accuracy, pearson for regression, loss), checked against it."""
    metric = metric if metric != "auto" else ("pearson" if regression else "accuracy") if task.classifies else "loss"
    if metric != "loss" and (not task.classifies or (metric in REGRESSION) != regression):
        raise OptionError(
            f"--metric {metric}: not reported for --task {task.name}"
            + (" with --num-labels 1" if regression else "")
            + "; choose "
            + ", ".join(["loss", *(REGRESSION if regression else CLASSIFICATION if task.classifies else ())])
        )
    return metric


def _recorded(model, data, revision, ckpt: Checkpoint, init_o: InitOptions, train_o: TrainOptions, seeds, lrs) -> dict:
    """The settings the manifest records: what every run shares, and what the runs were made from (the model's
    fingerprints and the data's digests, for `--resume`)."""
    shared = {k: v for k, v in asdict(init_o).items() if k != "method"}
    return {
        "tool": __version__,
        "model": str(model),
        "source": ckpt.describe(),
        "data": str(Path(data).absolute()),
        "revision": revision,
        **shared,
        **asdict(train_o),
        "eval_data": str(Path(train_o.eval_data).absolute()) if train_o.eval_data is not None else None,
        "seeds": seeds,
        "lrs": lrs,
        "source_samples": fingerprints(ckpt),
        "inputs": {
            "--data": input_digest(data),
            "--eval-data": input_digest(train_o.eval_data) if train_o.eval_data else None,
        },
    }
