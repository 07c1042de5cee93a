"""Compare initialisations on the user's model and data (the AILoRA paper's Fig. 3): same model, data, steps
and seed for each method (and, with `progressive`, each method with and without progressive training).

Each run is `decompose` then `train`, into OUT/<run>/decomposed and OUT/<run>/trained. The journal records
finished pieces, so `resume` never redoes a finished run and continues an interrupted one from its last
checkpoint. Runs are every method × learning rate × seed (`lr` sweeps, `seeds`); each method's rate is chosen
on the eval data. Then OUT/compare.md, train_loss.png, eval_loss.png, eval_<metric>.png (classification) and, last,
OUT/compare.json: first and final training loss, eval loss and metrics (final and best), steps to reach a loss
and a metric, time and trainable parameters per run, and their mean ± std over seeds per method and rate.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..errors import OptionError
from ..init import METHODS
from ..init.targets import architecture, assign_roles, linear_modules
from ..io.checkpoint import Checkpoint
from ..io.examples import check_rows
from ..io.hashing import file_digest
from ..io.output import JOURNAL_NAME, OutputDir
from ..manifests import COMPARE_MANIFEST, fingerprints, input_digest
from ..options import METRICS, DecomposeOptions, InitOptions, TaskOptions, TrainOptions, check
from ..training.metrics import CLASSIFICATION, HIGHER_IS_BETTER, REGRESSION, better

REPORT_NAME = "compare.md"
PLOT_TRAIN, PLOT_EVAL = "train_loss.png", "eval_loss.png"
DECOMPOSED, TRAINED = "decomposed", "trained"
#: the methods compared by default, in this order, when this version has them
#: calibration samples for data-aware methods: the first rows of the training data
CALIBRATION_SAMPLES = 64
DEFAULT_METHODS = ("lora", "pissa", "milora", "ailora", "lora-da")
#: --metric choices: what picks each method's learning rate (auto: accuracy, pearson for regression, or loss)
#: not an init method: `train --bitfit` on the model itself (no decompose; no progressive variant)
BITFIT = "bitfit"
#: "dora" is plain DoRA (`decompose --method lora --dora`); "METHOD+dora" is METHOD's init with DoRA's magnitudes
DORA = "dora"


def init_of(run_method: str) -> tuple[str, bool]:
    """(init method, DoRA) of a compare method name: "dora" -> ("lora", True), "pissa+dora" -> ("pissa", True)."""
    if run_method == DORA:
        return "lora", True
    method, plus, rest = run_method.partition("+")
    return method, bool(plus) and rest == DORA


def compare(
    model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, methods: list[str] | None = None,
    progressive: int | None = None, target_loss: float | None = None, smooth: int = 10,
    seeds: list[int] | str | None = None, metric: str = "auto", target_metric: float | None = None,
    init: InitOptions | None = None, training: TrainOptions | None = None, revision: str | None = None,
    resume: bool = False, overwrite: bool = False, progress: bool = True, **settings,
) -> dict:
    """Run decompose + train for each method (and seed and learning rate) with identical settings; write a table
    and plots.

    Args:
        model: local model directory or Hub id.
        data: training data (as for `train`: JSONL, CSV, TSV, Parquet or a `datasets` directory).
        out: output directory; must be empty unless `resume` or `overwrite`.
        methods: init methods to compare (default: lora, pissa, milora, ailora, and lora-da where it calibrates
            the model for the task: a Llama/Mistral/Qwen2 causal LM, a BERT/RoBERTa masked LM or classifier), and "bitfit": `train(bitfit=True)` on the model itself, no decompose; "dora":
            plain DoRA, and "METHOD+dora" (e.g. "pissa+dora"): that init with DoRA's magnitudes.
        progressive: K: also run every method with `train(progressive=K)` (runs named METHOD-progressiveK).
        target_loss: the loss for "steps to reach" (default: the highest final loss among the runs, which all
            of them reach; train and eval loss each get their own).
        smooth: training losses are a trailing mean over this many steps for "final" and "steps to reach".
        seeds: run every method with each seed (decompose's and train's; "0,1,2" or a list); tables show the
            mean ± std over them. Default: the one `seed`.
        metric: what chooses each method's learning rate and the target of "steps to reach": auto (accuracy for
            classification, pearson for regression, loss otherwise), loss, accuracy, f1, matthews, pearson,
            spearman; chosen on the eval data (without it: the final training loss).
        target_metric: the value of `metric` for "steps to reach" (default: the worst final value among the
            methods at their chosen rates).
        init: how every run's adapter starts (`InitOptions`; its `method` is replaced by each of `methods`).
        training: how every run trains (`TrainOptions`; eval_every defaults to a tenth of max_steps when there
            is eval data). `settings` replace fields of either by name (`seed`, `device` both), e.g.
            `compare(model, data, out, rank=8, max_steps=300, eval_data="eval.jsonl")`. `lr` may also be a
            sweep: a list of rates (every method runs each; the best on eval is its rate), a mapping method ->
            rate or rates, or their text form ("1e-4,5e-4,2e-3", "pissa=1e-4,lora=5e-4").
        revision: Hub revision of `model`.
        resume: keep finished runs of an interrupted comparison with the same settings and continue the
            interrupted run (from its last checkpoint: use `save_every`; its time then counts the resumed part
            only). overwrite: start again.

    Returns:
        {"output", "runs": [one record per run], "summary": [one record per method and rate, mean/std over
        seeds], "best_lr": {method: rate}, "targets", "report", "plots", "seconds"}.

    Raises:
        AiloraError subclasses on bad input (methods, rates, seeds, targets, roles, files, columns, labels),
        before any run starts.

    Example:
        >>> compare("Qwen/Qwen2.5-0.5B", "train.jsonl", "cmp", eval_data="eval.jsonl", max_steps=300)  # doctest: +SKIP
    """
    from ..decomposition.pipeline import decompose
    from ..training.bitfit import check_bitfit
    from ..training.tasks import resolve_task
    from ..training.trainer import CKPT_DIR, train

    started = time.perf_counter()
    check("--progressive", progressive, low=1)
    check("--smooth", smooth, low=1)
    check("--metric", metric, choices=METRICS)
    lr_spec = settings.pop("lr", None)
    if isinstance(lr_spec, (int, float)) and not isinstance(lr_spec, bool):
        settings["lr"], lr_spec = lr_spec, None
    unknown = sorted(set(settings) - set(InitOptions.defaults()) - set(TrainOptions.defaults()))
    if unknown:
        raise OptionError(f"compare has no setting {', '.join(unknown)}")
    init_o = InitOptions.build(init, **{k: v for k, v in settings.items() if k in InitOptions.defaults()})
    train_o = TrainOptions.build(training, **{k: v for k, v in settings.items() if k in TrainOptions.defaults()})
    ckpt = Checkpoint.open(model, revision=revision)
    task = resolve_task(train_o.task, ckpt.config)
    from ..init.lora_da.calibration import TASKS as CALIBRATED

    calibrates = ckpt.config.get("model_type") in CALIBRATED.get(task.name, ())  # LoRA-DA, for this model and task
    default = [m for m in DEFAULT_METHODS if m in METHODS and (calibrates or not METHODS[m].needs_data)]
    methods = list(methods) if methods is not None else default
    unknown = [m for m in methods if m != BITFIT and (init_of(m)[0] not in METHODS or "+" in m and not init_of(m)[1])]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise OptionError(f"--methods {','.join(methods)}: give each once, from {', '.join([*METHODS, BITFIT, DORA])} "
                          "(METHOD+dora for an init with DoRA)")
    calibrating = [m for m in methods if m != BITFIT and METHODS[init_of(m)[0]].needs_data]
    if calibrating and not calibrates:
        raise OptionError(f"--methods {','.join(calibrating)}: LoRA-DA does not calibrate a "
                          f"{ckpt.config.get('model_type')} model for --task {task.name} (it calibrates "
                          + "; ".join(f"{', '.join(types)} for {t}" for t, types in CALIBRATED.items())
                          + "); leave it out")
    lrs = parse_lrs(lr_spec, methods, train_o.lr)
    seeds = parse_seeds(seeds)
    regression = train_o.num_labels == 1
    metric = metric if metric != "auto" else ("pearson" if regression else "accuracy") if task.classifies else "loss"
    if metric != "loss" and (not task.classifies or (metric in REGRESSION) != regression):
        raise OptionError(f"--metric {metric}: not reported for --task {task.name}"
                          + (" with --num-labels 1" if regression else "") + "; choose "
                          + ", ".join(["loss", *(REGRESSION if regression else CLASSIFICATION if task.classifies else ())]))
    rows = {}
    for flag, path in (("--data", data), ("--eval-data", train_o.eval_data)):
        if path is not None:  # every row, before any run (columns, labels)
            rows[flag] = check_rows(path, flag=flag, task=task.name, columns=train_o.columns, regression=regression)
    names = list(linear_modules(ckpt.tensors))
    for m in (m for m in methods if m != BITFIT):  # a role error in the last method would surface too late
        assign_roles(METHODS[init_of(m)[0]], list(init_o.targets), names, architecture(ckpt.config), init_o.roles)
    if BITFIT in methods:  # a model without bias terms (Llama) is refused now, not after the other runs
        check_bitfit(ckpt, base=model, adapter=None, bitfit=True, progressive=None)
    if train_o.eval_every is None and train_o.eval_data is not None and train_o.max_steps:
        train_o = TrainOptions.build(train_o, eval_every=max(1, train_o.max_steps // 10))
    groups = [(m, None) for m in methods] + ([(m, progressive) for m in methods if m != BITFIT] if progressive else [])
    runs = [(m, k, lr, seed) for m, k in groups for lr in lrs[m] for seed in (seeds or [None])]
    shared = {k: v for k, v in asdict(init_o).items() if k != "method"}
    settings = {"tool": __version__, "model": str(model), "source": ckpt.describe(), "data": str(Path(data).absolute()),
                "revision": revision, **shared, **asdict(train_o),
                "eval_data": str(Path(train_o.eval_data).absolute()) if train_o.eval_data is not None else None,
                "seeds": seeds, "lrs": lrs,
                # what the runs were made from: the model's fingerprints and the data's digests (--resume)
                "source_samples": fingerprints(ckpt),
                "inputs": {"--data": input_digest(data),
                           "--eval-data": input_digest(train_o.eval_data) if train_o.eval_data else None}}
    records = []
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=settings) as od:
        bar = tqdm(runs, desc="compare", unit="run", disable=not progress)
        for method, k, lr, seed in runs:
            name = run_name(method, k, lr if len(lrs[method]) > 1 else None, seed if len(seeds or ()) > 1 else None)
            bar.set_postfix(run=name, refresh=False)
            if (done := od.finished(name)) is not None:
                records.append(done)
                bar.update(1)
                continue
            key = run_name(method, None, None, seed if len(seeds or ()) > 1 else None)  # shared by rates, K
            dec_dir, tr_dir = od.path / key / DECOMPOSED, od.path / name / TRAINED
            dec = od.finished(f"{key}/{DECOMPOSED}")
            if method == BITFIT:  # no decompose: the model's own bias terms train
                dec = {"residual": None, "adapter": None, "seconds": 0.0}
            elif dec is None:
                calib = ({"data": data, "samples": min(CALIBRATION_SAMPLES, rows["--data"]),
                          "max_length": train_o.max_length,
                          **{k: getattr(train_o, k) for k in TaskOptions.defaults()}}  # for train's task and columns
                         if METHODS[init_of(method)[0]].needs_data else {})  # lora-da calibrates on the training data
                method_, dora = init_of(method)
                seeded = {} if seed is None else {"seed": seed}
                options = DecomposeOptions.build(None, **{**shared, **seeded, "method": method_, "dora": dora},
                                                 revision=revision,
                                                 **calib)
                dec = decompose(model, dec_dir, options=options, progress=progress, **_again(dec_dir))
                od.mark_done(f"{key}/{DECOMPOSED}", dec)
            base = dec["residual"] or ckpt.root  # plain LoRA trains on the untouched model
            again = _again(tr_dir) if any((tr_dir / CKPT_DIR).glob("step-*/trainer_state.json")) else {"overwrite": True}
            run_o = TrainOptions.build(train_o, progressive=k, lr=lr, bitfit=method == BITFIT,
                                       **({} if seed is None else {"seed": seed}))
            tr = train(base, dec["adapter"], data, tr_dir, options=run_o, progress=progress, **again)
            record = {"run": name, "method": method, "progressive": k, "lr": lr, "seed": run_o.seed,
                      "decompose_seconds": dec["seconds"], "train_seconds": tr["seconds"],
                      "trainable_parameters": tr["trainable_parameters"], "steps": tr["steps"]}
            od.mark_done(name, record)
            records.append(record)
            bar.update(1)
        bar.close()
        curves = {r["run"]: read_curves(od.path / r["run"] / TRAINED / "metrics.jsonl") for r in records}
        smoothed = {run: trailing_mean(c["train"], smooth) for run, c in curves.items()}
        summary, best_lr, goal = _summarise(records, curves, smoothed, target_loss, metric, target_metric)
        plots = _plots(od, records, best_lr, curves, smoothed, goal, smooth, metric)
        with od.open_atomic(REPORT_NAME, "w") as f:
            f.write(report(summary, best_lr, goal, settings, plots, smooth, metric))
        od.write_manifest(COMPARE_MANIFEST, {**settings, "methods": methods, "progressive": progressive,
                                          "smooth": smooth, "metric": metric, "targets_loss": goal,
                                          "runs": records, "summary": summary, "best_lr": best_lr, "plots": plots,
                                          "files": {"output": {f: file_digest(od.path / f)
                                                               for f in [REPORT_NAME, *plots]}}})
    return {"output": str(od.path), "runs": records, "summary": summary, "best_lr": best_lr, "targets": goal,
            "report": str(od.path / REPORT_NAME), "plots": plots, "seconds": round(time.perf_counter() - started, 3)}


def run_name(method: str, progressive: int | None, lr: float | None, seed: int | None) -> str:
    """A run's directory: METHOD[-progressiveK][-lrRATE][-seedS] (rate and seed only when swept)."""
    return (method + (f"-progressive{progressive}" if progressive else "") + (f"-lr{lr:g}" if lr is not None else "")
            + (f"-seed{seed}" if seed is not None else ""))


def group_name(method: str, progressive: int | None) -> str:
    return run_name(method, progressive, None, None)


def parse_lrs(spec, methods: list[str], default: float) -> dict[str, list[float]]:
    """Learning rates per method from `--lr`: None (every method `default`), a rate, a list of rates (every method
    each), a mapping method -> rate(s), or text: "1e-4,5e-4" (every method each), "pissa=1e-4,lora=5e-4" (per
    method; a method named twice gets both; plain rates mixed in apply to methods not named; methods neither
    named nor given plain rates get `default`).

    Raises:
        OptionError: a rate that is not a positive number, a method not compared.
    """
    plain, per = [], {}
    if spec is None:
        pass
    elif isinstance(spec, dict):
        per = {m: list(v) if isinstance(v, (list, tuple)) else [v] for m, v in spec.items()}
    elif isinstance(spec, (list, tuple)):
        plain = list(spec)
    elif isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, value = part.rpartition("=")
            (per.setdefault(name.strip(), []) if sep else plain).append(value.strip())
    else:
        plain = [spec]
    text = spec if isinstance(spec, str) else json.dumps(spec, default=str)
    unknown = sorted(set(per) - set(methods))
    if unknown:
        raise OptionError(f"--lr {text}: {', '.join(unknown)} is not among the compared methods ({', '.join(methods)})")
    out = {}
    for m in methods:
        rates = []
        for v in per.get(m) or plain or [default]:
            try:
                rate = float(v)
            except (TypeError, ValueError):
                raise OptionError(f"--lr {text}: {v!r} is not a number; give rates (1e-4,5e-4) or METHOD=RATE "
                                  "pairs") from None
            if not math.isfinite(rate) or rate <= 0:
                raise OptionError(f"--lr {text}: rate {v} must be a finite number greater than 0")
            if rate not in rates:
                rates.append(rate)
        out[m] = rates
    return out


def parse_seeds(spec) -> list[int] | None:
    """`--seeds`: "0,1,2" or a list of integers, each once; None when not given.

    Raises:
        OptionError: not integers, or one given twice.
    """
    if spec is None:
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    try:
        seeds = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise OptionError(f"--seeds {spec}: give integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(str(p).strip() != str(s) for p, s in zip(parts, seeds)):
        raise OptionError(f"--seeds {spec}: give integers, each once, e.g. 0,1,2")
    return seeds


def _again(path: Path) -> dict:
    """How to call a sub-command on a directory an earlier compare left: resume its journal, else start over."""
    return {"resume": True} if (path / JOURNAL_NAME).is_file() else {"overwrite": True}


def read_curves(metrics: Path) -> dict:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)], "metrics": {name: [(step, eval_<name>)]}} from a train
    output's metrics.jsonl (last row per step; None values, such as an undefined correlation, are left out)."""
    train, evals, scores = {}, {}, {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
        for key, value in row.items():
            if key.startswith("eval_") and key != "eval_loss":
                scores.setdefault(key.removeprefix("eval_"), {})[row["step"]] = value
    return {"train": sorted(train.items()), "eval": sorted(evals.items()),
            "metrics": {k: sorted((s, v) for s, v in c.items() if v is not None) for k, c in scores.items()}}


def trailing_mean(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each (step, value) with the value averaged with up to `window` − 1 values before it."""
    out, total = [], 0.0
    for i, (step, v) in enumerate(curve):
        total += v - (curve[i - window][1] if i >= window else 0.0)
        out.append((step, total / min(i + 1, window)))
    return out


def steps_to_reach(curve: list[tuple[int, float]], target: float, *, higher: bool = False) -> int | None:
    """The first step whose value is at or below `target` (at or above with `higher`), or None."""
    return next((step for step, v in curve if (v >= target if higher else v <= target)), None)


def mean_std(values: list) -> dict | None:
    """{"mean", "std", "n"} of the values that are not None (std over seeds: the sample's, 0 for one value)."""
    import statistics

    vs = [v for v in values if v is not None]
    if not vs:
        return None
    return {"mean": statistics.fmean(vs), "std": statistics.stdev(vs) if len(vs) > 1 else 0.0, "n": len(vs)}


def _selection(r: dict, metric: str) -> float | None:
    """The value that ranks a run: its final eval `metric` (loss: eval loss, or without eval data train loss)."""
    if metric == "loss":
        return r["eval_loss"] if r["eval_loss"] is not None else r["final_loss"]
    return r["eval"].get(metric)


#: per-run values aggregated over seeds in the summary
STATS = ("first_loss", "final_loss", "eval_loss_start", "eval_loss", "steps_to_train_target", "steps_to_eval_target",
         "steps_to_metric_target", "train_seconds", "decompose_seconds", "selection")


def _summarise(records: list[dict], curves: dict, smoothed: dict, target_loss: float | None, metric: str,
               target_metric: float | None) -> tuple[list[dict], dict, dict]:
    """Add each run's losses and metrics (from its metrics.jsonl, which a resumed run continues) and steps to reach
    the targets to its record; aggregate over seeds per method and rate; choose each method's rate.

    Returns:
        (summary: one record per method and rate, best_lr: {method: rate}, the targets).
    """
    higher = HIGHER_IS_BETTER[metric]
    for r in records:
        c = curves[r["run"]]
        train, evals = c["train"], c["eval"]
        r["first_loss"] = train[0][1] if train else None
        r["final_loss"] = smoothed[r["run"]][-1][1] if train else None
        r["eval_loss_start"] = evals[0][1] if evals and evals[0][0] == 0 else None
        r["eval_loss"] = evals[-1][1] if evals else None
        r["eval_start"] = {k: v[0][1] for k, v in c["metrics"].items() if v and v[0][0] == 0}
        r["eval"] = {k: v[-1][1] for k, v in c["metrics"].items() if v}
        r["best"] = {k: (max if HIGHER_IS_BETTER.get(k, True) else min)(x for s, x in v if s > 0)
                     for k, v in c["metrics"].items() if any(s > 0 for s, _ in v)}
        if evals and any(s > 0 for s, _ in evals):
            r["best"]["loss"] = min(x for s, x in evals if s > 0)
        r["selection"] = _selection(r, metric)
    by_rate: dict[tuple, list[dict]] = {}
    for r in records:
        by_rate.setdefault((group_name(r["method"], r["progressive"]), r["lr"]), []).append(r)
    best_lr: dict[str, float] = {}
    chosen: dict[str, float | None] = {}
    for (group, lr), runs in by_rate.items():
        value = (mean_std([r["selection"] for r in runs]) or {}).get("mean")
        if group not in best_lr or better(metric, value, chosen[group]):
            best_lr[group], chosen[group] = lr, value
    best = [r for r in records if r["lr"] == best_lr[group_name(r["method"], r["progressive"])]]
    finals = [r["final_loss"] for r in best if r["final_loss"] is not None]
    evals = [r["eval_loss"] for r in best if r["eval_loss"] is not None]
    values = [v for r in best if metric != "loss" and (v := r["eval"].get(metric)) is not None]
    goal = {"train": target_loss if target_loss is not None else max(finals, default=None),
            "eval": target_loss if target_loss is not None else max(evals, default=None),
            "given": target_loss is not None, "metric_name": metric,
            "metric": target_metric if target_metric is not None else (min if higher else max)(values, default=None)}
    for r in records:
        r["steps_to_train_target"] = steps_to_reach(smoothed[r["run"]], goal["train"]) if finals else None
        r["steps_to_eval_target"] = steps_to_reach(curves[r["run"]]["eval"], goal["eval"]) if evals else None
        r["steps_to_metric_target"] = (steps_to_reach(curves[r["run"]]["metrics"].get(metric, []), goal["metric"],
                                                      higher=higher) if goal["metric"] is not None else None)
    summary = []
    for (group, lr), runs in by_rate.items():
        names = sorted({k for r in runs for k in r["eval"]})
        summary.append({
            "run": group, "method": runs[0]["method"], "progressive": runs[0]["progressive"], "lr": lr,
            "best_lr": lr == best_lr[group], "seeds": [r["seed"] for r in runs], "runs": [r["run"] for r in runs],
            "trainable_parameters": runs[0]["trainable_parameters"],
            **{k: mean_std([r[k] for r in runs]) for k in STATS},
            "reached": {k: sum(r[k] is not None for r in runs) for k in STATS if k.startswith("steps_to")},
            "eval": {k: mean_std([r["eval"].get(k) for r in runs]) for k in names},
            "best": {k: mean_std([r["best"].get(k) for r in runs]) for k in names},
        })
    return summary, best_lr, goal


def _plots(od: OutputDir, records: list[dict], best_lr: dict, curves: dict, smoothed: dict, goal: dict, smooth: int,
           metric: str) -> list[str]:
    """train_loss.png, eval_loss.png and eval_<metric>.png: each method at its chosen rate, the mean over seeds with
    a band of ± one standard deviation."""
    from .plots import band_figure

    groups: dict[str, list[str]] = {}
    swept = any(len({r["lr"] for r in records if group_name(r["method"], r["progressive"]) == g}) > 1 for g in best_lr)
    for r in records:
        g = group_name(r["method"], r["progressive"])
        if r["lr"] == best_lr[g]:
            groups.setdefault(f"{g} (lr {r['lr']:g})" if swept else g, []).append(r["run"])
    written = []
    panels = [(PLOT_TRAIN, {label: [smoothed[run] for run in runs] for label, runs in groups.items()},
               f"Training loss ({smooth}-step trailing mean)" if smooth > 1 else "Training loss", "loss", goal["train"]),
              (PLOT_EVAL, {label: [curves[run]["eval"] for run in runs] for label, runs in groups.items()},
               "Eval loss", "eval loss", goal["eval"])]
    if metric != "loss":
        panels.append((f"eval_{metric}.png", {label: [curves[run]["metrics"].get(metric, []) for run in runs]
                                               for label, runs in groups.items()}, f"Eval {metric}", metric,
                       goal["metric"]))
    for name, series, title, ylabel, target in panels:
        series = {label: [c for c in cs if c] for label, cs in series.items()}
        if any(series.values()):
            with od.open_atomic(name) as f:
                band_figure(f, {k: v for k, v in series.items() if v}, title=title, ylabel=ylabel, target=target)
            written.append(name)
    return written


def report(summary: list[dict], best_lr: dict, goal: dict, settings: dict, plots: list[str], smooth: int,
           metric: str = "loss") -> str:
    """The markdown report: settings, one table row per method at its chosen rate (mean ± std over seeds), every
    rate of a sweep, the plots."""
    def num(v, fmt="{:.4f}"):
        if v is None:
            return ""
        if isinstance(v, dict):
            return fmt.format(v["mean"]) + (f" ± {fmt.format(v['std'])}" if v["n"] > 1 else "")
        return fmt.format(v)

    def steps(row, key, target):
        n, total = row["reached"][key], len(row["seeds"])
        if target is None:
            return ""
        if not n:
            return "not reached"
        return num(row[key], "{:.1f}" if total > 1 else "{:.0f}") + ("" if n == total else f" ({n}/{total} seeds)")

    how = "given" if goal["given"] else "the highest final value among the methods at their chosen rates"
    length = f"{settings['max_steps']} steps" if settings["max_steps"] else f"{settings['epochs']} epoch(s)"
    seeds = settings["seeds"]
    rates = sorted({lr for v in settings["lrs"].values() for lr in v})
    chosen = [row for row in summary if row["best_lr"]]
    names = sorted({k for row in chosen for k in row["eval"]}, key=lambda k: (k != metric, k))
    lines = [
        "# Initialisation comparison", "",
        f"Model `{settings['model']}`, data `{settings['data']}`"
        + (f", eval data `{settings['eval_data']}`" if settings["eval_data"] else "")
        + f"; task {settings['task']}; {length}, lr {', '.join(f'{r:g}' for r in rates)}, batch "
        f"{settings['batch_size']}×{settings['grad_accum']}, rank {settings['rank']}, targets "
        f"{', '.join(settings['targets'])}, "
        + (f"seeds {', '.join(map(str, seeds))} (mean ± std)" if seeds else f"seed {settings['seed']}") + ".", "",
        f"Train loss: a {smooth}-step trailing mean. Target loss ({how}): train {num(goal['train'])}"
        + (f", eval {num(goal['eval'])}" if goal["eval"] is not None else "") + "."
        + (f" Target {metric}: {num(goal['metric'])}." if metric != "loss" and goal["metric"] is not None else ""),
        "",
    ]
    if len(rates) > 1:
        lines += [f"Each method at its best learning rate by final eval {metric} (all rates below and in compare.json).",
                  ""]
    head = ["run", "lr", "trainable params", "first train loss", "final train loss", "steps to train target",
            "eval loss start", "final eval loss", "steps to eval target"]
    for k in names:
        head += [f"final {k}", f"best {k}"] + ([f"steps to {k} target"] if k == metric else [])
    head += ["train s", "decompose s"]
    lines += ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for row in chosen:
        cells = [row["run"], f"{row['lr']:g}", f"{row['trainable_parameters']:,}", num(row["first_loss"]),
                 num(row["final_loss"]), steps(row, "steps_to_train_target", goal["train"]),
                 num(row["eval_loss_start"]), num(row["eval_loss"]),
                 steps(row, "steps_to_eval_target", goal["eval"])]
        for k in names:
            cells += [num(row["eval"].get(k)), num(row["best"].get(k))]
            cells += [steps(row, "steps_to_metric_target", goal["metric"])] if k == metric else []
        cells += [num(row["train_seconds"], "{:.1f}"), num(row["decompose_seconds"], "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if len(rates) > 1:
        what = f"final eval {metric}" if metric != "loss" else "final eval loss (train loss without eval data)"
        lines += [f"## Learning rates: {what}", "", "| run | lr | " + what + " | chosen |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {row['run']} | {row['lr']:g} | {num(row['selection'])} | {'yes' if row['best_lr'] else ''} |"
                  for row in summary]
        lines.append("")
    lines += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
