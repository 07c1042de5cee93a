"""Compare initialisations on the user's model and data (the AILoRA paper's Fig. 3): same model, data, steps
and seed for each method (and, with `progressive`, each method with and without progressive training).

Each run is `decompose` then `train`, into OUT/<run>/decomposed and OUT/<run>/trained. The journal records
finished pieces, so `resume` never redoes a finished run and continues an interrupted one from its last
checkpoint. Then OUT/compare.md, train_loss.png, eval_loss.png and, last, OUT/compare.json: first and final
training loss, eval loss, steps to reach a loss, time and trainable parameters per run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..io.checkpoint import Checkpoint
from ..errors import InputNotFoundError, OptionError
from ..io.hashing import file_digest
from ..io.examples import check_rows
from ..init import METHODS
from ..io.output import JOURNAL_NAME, OutputDir
from ..options import DecomposeOptions, InitOptions, TrainOptions, check
from ..init.targets import architecture, assign_roles, linear_modules
from ..manifests import COMPARE_MANIFEST, fingerprints

REPORT_NAME = "compare.md"
PLOT_TRAIN, PLOT_EVAL = "train_loss.png", "eval_loss.png"
DECOMPOSED, TRAINED = "decomposed", "trained"
#: the methods compared by default, in this order, when this version has them
#: calibration samples for data-aware methods: the first rows of the training data
CALIBRATION_SAMPLES = 64
DEFAULT_METHODS = ("lora", "pissa", "milora", "ailora", "lora-da")
#: not an init method: `train --bitfit` on the model itself (no decompose; no progressive variant)
BITFIT = "bitfit"


def compare(
    model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, methods: list[str] | None = None,
    progressive: int | None = None, target_loss: float | None = None, smooth: int = 10,
    init: InitOptions | None = None, training: TrainOptions | None = None, revision: str | None = None,
    resume: bool = False, overwrite: bool = False, progress: bool = True, **settings,
) -> dict:
    """Run decompose + train for each method with identical settings; write a table and loss plots.

    Args:
        model: local model directory or Hub id.
        data: training JSONL (as for `train`).
        out: output directory; must be empty unless `resume` or `overwrite`.
        methods: init methods to compare (default: lora, pissa, milora, ailora, and lora-da when available), and
            "bitfit": `train(bitfit=True)` on the model itself, no decompose.
        progressive: K: also run every method with `train(progressive=K)` (runs named METHOD-progressiveK).
        target_loss: the loss for "steps to reach" (default: the highest final loss among the runs, which all
            of them reach; train and eval loss each get their own).
        smooth: training losses are a trailing mean over this many steps for "final" and "steps to reach".
        init: how every run's adapter starts (`InitOptions`; its `method` is replaced by each of `methods`).
        training: how every run trains (`TrainOptions`; eval_every defaults to a tenth of max_steps when there
            is eval data). `settings` replace fields of either by name (`seed`, `device` both), e.g.
            `compare(model, data, out, rank=8, max_steps=300, eval_data="eval.jsonl")`.
        revision: Hub revision of `model`.
        resume: keep finished runs of an interrupted comparison with the same settings and continue the
            interrupted run (from its last checkpoint: use `save_every`; its time then counts the resumed part
            only). overwrite: start again.

    Returns:
        {"output", "runs": [one record per run], "targets": {"train", "eval"}, "report", "plots", "seconds"}.

    Raises:
        AiloraError subclasses on bad input (methods, targets, roles, files), before any run starts;

    Example:
        >>> compare("Qwen/Qwen2.5-0.5B", "train.jsonl", "cmp", eval_data="eval.jsonl", max_steps=300)  # doctest: +SKIP
    """
    from ..decomposition.pipeline import decompose
    from ..training.bitfit import check_bitfit
    from ..training.trainer import CKPT_DIR, train

    started = time.perf_counter()
    methods = list(methods) if methods is not None else [m for m in DEFAULT_METHODS if m in METHODS]
    unknown = [m for m in methods if m not in METHODS and m != BITFIT]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise OptionError(f"--methods {','.join(methods)}: give each once, from {', '.join([*METHODS, BITFIT])}")
    check("--progressive", progressive, low=1)
    check("--smooth", smooth, low=1)
    unknown = sorted(set(settings) - set(InitOptions.defaults()) - set(TrainOptions.defaults()))
    if unknown:
        raise OptionError(f"compare has no setting {', '.join(unknown)}")
    init_o = InitOptions.build(init, **{k: v for k, v in settings.items() if k in InitOptions.defaults()})
    train_o = TrainOptions.build(training, **{k: v for k, v in settings.items() if k in TrainOptions.defaults()})
    for flag, path in (("--data", data), ("--eval-data", train_o.eval_data)):
        if path is not None and not Path(path).is_file():
            raise InputNotFoundError(f"{flag} {path}: no such data file")
    ckpt = Checkpoint.open(model, revision=revision)
    names = list(linear_modules(ckpt.tensors))
    for m in (m for m in methods if m != BITFIT):  # a role error in the last method would surface too late
        assign_roles(METHODS[m], list(init_o.targets), names, architecture(ckpt.config), init_o.roles)
    if BITFIT in methods:  # a model without bias terms (Llama) is refused now, not after the other runs
        check_bitfit(ckpt, base=model, adapter=None, bitfit=True, progressive=None)
    if train_o.eval_every is None and train_o.eval_data is not None and train_o.max_steps:
        train_o = TrainOptions.build(train_o, eval_every=max(1, train_o.max_steps // 10))
    runs = [(m, None) for m in methods] + ([(m, progressive) for m in methods if m != BITFIT] if progressive else [])
    shared = {k: v for k, v in asdict(init_o).items() if k != "method"}
    settings = {"tool": __version__, "model": str(model), "source": ckpt.describe(), "data": str(Path(data).absolute()),
                "revision": revision, **shared, **asdict(train_o),
                "eval_data": str(Path(train_o.eval_data).absolute()) if train_o.eval_data is not None else None,
                # what the runs were made from: the model's fingerprints and the data files' digests (--resume)
                "source_samples": fingerprints(ckpt),
                "inputs": {"--data": file_digest(data),
                           "--eval-data": file_digest(train_o.eval_data) if train_o.eval_data else None}}
    records = []
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=settings) as od:
        bar = tqdm(runs, desc="compare", unit="run", disable=not progress)
        for method, k in bar:
            name = method if k is None else f"{method}-progressive{k}"
            bar.set_postfix(run=name, refresh=False)
            if (done := od.finished(name)) is not None:
                records.append(done)
                continue
            dec_dir, tr_dir = od.path / name / DECOMPOSED, od.path / name / TRAINED
            dec = od.finished(f"{name}/{DECOMPOSED}")
            if method == BITFIT:  # no decompose: the model's own bias terms train
                dec = {"residual": None, "adapter": None, "seconds": 0.0}
            elif dec is None:
                calib = ({"data": data, "samples": min(CALIBRATION_SAMPLES, check_rows(data)),
                          "max_length": train_o.max_length}
                         if METHODS[method].needs_data else {})  # lora-da calibrates on the training data
                options = DecomposeOptions.build(None, **shared, method=method, revision=revision, **calib)
                dec = decompose(model, dec_dir, options=options, progress=progress, **_again(dec_dir))
                od.mark_done(f"{name}/{DECOMPOSED}", dec)
            base = dec["residual"] or ckpt.root  # plain LoRA trains on the untouched model
            again = _again(tr_dir) if any((tr_dir / CKPT_DIR).glob("step-*/trainer_state.json")) else {"overwrite": True}
            tr = train(base, dec["adapter"], data, tr_dir, progress=progress, **again,
                       options=TrainOptions.build(train_o, progressive=k, bitfit=method == BITFIT))
            record = {"run": name, "method": method, "progressive": k, "decompose_seconds": dec["seconds"],
                      "train_seconds": tr["seconds"], "trainable_parameters": tr["trainable_parameters"],
                      "steps": tr["steps"]}
            od.mark_done(name, record)
            records.append(record)
        bar.close()
        curves = {r["run"]: read_curves(od.path / r["run"] / TRAINED / "metrics.jsonl") for r in records}
        smoothed = {run: trailing_mean(c["train"], smooth) for run, c in curves.items()}
        goal = _summarise(records, curves, smoothed, target_loss)
        plots = _plots(od, curves, smoothed, goal, smooth)
        with od.open_atomic(REPORT_NAME, "w") as f:
            f.write(report(records, goal, settings, plots, smooth))
        od.write_manifest(COMPARE_MANIFEST, {**settings, "methods": methods, "progressive": progressive,
                                          "smooth": smooth, "targets_loss": goal, "runs": records, "plots": plots,
                                          "files": {"output": {f: file_digest(od.path / f)
                                                               for f in [REPORT_NAME, *plots]}}})
    return {"output": str(od.path), "runs": records, "targets": goal, "report": str(od.path / REPORT_NAME),
            "plots": plots, "seconds": round(time.perf_counter() - started, 3)}


def _again(path: Path) -> dict:
    """How to call a sub-command on a directory an earlier compare left: resume its journal, else start over."""
    return {"resume": True} if (path / JOURNAL_NAME).is_file() else {"overwrite": True}


def read_curves(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)]} from a train output's metrics.jsonl (last row per step)."""
    train, evals = {}, {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    return {"train": sorted(train.items()), "eval": sorted(evals.items())}


def trailing_mean(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each (step, value) with the value averaged with up to `window` − 1 values before it."""
    out, total = [], 0.0
    for i, (step, v) in enumerate(curve):
        total += v - (curve[i - window][1] if i >= window else 0.0)
        out.append((step, total / min(i + 1, window)))
    return out


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose value is at or below `target`, or None."""
    return next((step for step, v in curve if v <= target), None)


def _summarise(records: list[dict], curves: dict, smoothed: dict, target_loss: float | None) -> dict:
    """Add each run's losses (from its metrics.jsonl, which a resumed run continues) and steps to reach the
    targets to its record; return the targets."""
    for r in records:
        train, evals = curves[r["run"]]["train"], curves[r["run"]]["eval"]
        r["first_loss"] = train[0][1] if train else None
        r["final_loss"] = smoothed[r["run"]][-1][1] if train else None
        r["eval_loss_start"] = evals[0][1] if evals and evals[0][0] == 0 else None
        r["eval_loss"] = evals[-1][1] if evals else None
    finals = [r["final_loss"] for r in records if r["final_loss"] is not None]
    evals = [r["eval_loss"] for r in records if r["eval_loss"] is not None]
    goal = {"train": target_loss if target_loss is not None else max(finals, default=None),
            "eval": target_loss if target_loss is not None else max(evals, default=None),
            "given": target_loss is not None}
    for r in records:
        r["steps_to_train_target"] = steps_to_reach(smoothed[r["run"]], goal["train"]) if finals else None
        r["steps_to_eval_target"] = steps_to_reach(curves[r["run"]]["eval"], goal["eval"]) if evals else None
    return goal


def _plots(od: OutputDir, curves: dict, smoothed: dict, goal: dict, smooth: int) -> list[str]:
    from .plots import loss_figure

    written = []
    train = {run: c["train"] for run, c in curves.items() if c["train"]}
    if train:
        with od.open_atomic(PLOT_TRAIN) as f:
            loss_figure(f, train, smoothed=smoothed if smooth > 1 else None, target=goal["train"], ylabel="loss",
                        title=f"Training loss ({smooth}-step trailing mean)" if smooth > 1 else "Training loss")
        written.append(PLOT_TRAIN)
    evals = {run: c["eval"] for run, c in curves.items() if c["eval"]}
    if evals:
        with od.open_atomic(PLOT_EVAL) as f:
            loss_figure(f, evals, target=goal["eval"], title="Eval loss", ylabel="eval loss")
        written.append(PLOT_EVAL)
    return written


def report(records: list[dict], goal: dict, settings: dict, plots: list[str], smooth: int) -> str:
    """The markdown report: settings, one table row per run, the plots."""
    def num(v, fmt="{:.4f}"):
        return "" if v is None else fmt.format(v)

    how = "given" if goal["given"] else "the highest final value among the runs"
    steps = settings["max_steps"] if settings["max_steps"] else f"{settings['epochs']} epoch(s)"
    lines = [
        "# Initialisation comparison", "",
        f"Model `{settings['model']}`, data `{settings['data']}`"
        + (f", eval data `{settings['eval_data']}`" if settings["eval_data"] else "")
        + f"; {steps} steps, lr {settings['lr']}, batch {settings['batch_size']}×{settings['grad_accum']}, "
        f"rank {settings['rank']}, targets {', '.join(settings['targets'])}, seed {settings['seed']}.", "",
        f"Train loss: a {smooth}-step trailing mean. Target loss ({how}): train {num(goal['train'])}"
        + (f", eval {num(goal['eval'])}" if goal["eval"] is not None else "") + ".", "",
        "| run | trainable params | first train loss | final train loss | steps to train target | eval loss start "
        "| final eval loss | steps to eval target | train s | decompose s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        lines.append(f"| {r['run']} | {r['trainable_parameters']:,} | {num(r['first_loss'])} | {num(r['final_loss'])} "
                     f"| {num(r['steps_to_train_target'], '{}') or 'not reached'} | {num(r['eval_loss_start'])} "
                     f"| {num(r['eval_loss'])} | "
                     f"{num(r['steps_to_eval_target'], '{}') or ('not reached' if goal['eval'] is not None else '')} "
                     f"| {r['train_seconds']:.1f} | {r['decompose_seconds']:.1f} |")
    lines.append("")
    lines += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
