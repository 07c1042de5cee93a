"""Compare initialisations on the user's model and data (the AILoRA paper's Fig. 3): same model, data, steps
and seed for each method (and, with `progressive`, each method with and without progressive training).

Each run is `decompose` then `train`, into OUT/<run>/decomposed and OUT/<run>/trained. The journal records
finished pieces, so `resume` never redoes a finished run and continues an interrupted one from its last
checkpoint. Runs are every method × learning rate × seed (`lr` sweeps, `seeds`); each method's rate is chosen
on the eval data. Then OUT/compare.md, train_loss.png, eval_loss.png, eval_<metric>.png (classification) and, last,
OUT/compare.json: first and final training loss, eval loss and metrics (final and best), steps to reach a loss
and a metric, time and trainable parameters per run, and their mean ± std over seeds per method and rate.
Planning (`plan`) checks every input first; this module executes the plan.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..decomposition import pipeline
from ..errors import NumericsError
from ..init import METHODS
from ..io.hashing import file_digest
from ..io.output import JOURNAL_NAME, OutputDir
from ..manifests import COMPARE_MANIFEST
from ..options import (
    DecomposeOptions,
    InitOptions,
    TaskOptions,
    TrainOptions,
)
from ..training import trainer
from .costs import describe, run_bounds
from .curves import read_curves, trailing_mean
from .plan import CALIBRATION_SAMPLES, ComparePlan, Run, plan_comparison
from .report import REPORT_NAME, report, write_plots
from .schedule import schedule
from .summary import summarise, verdicts
from .sweeps import BITFIT, init_of, run_name

DECOMPOSED, TRAINED = "decomposed", "trained"


def compare(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | str | None = None,
    init: InitOptions | None = None,
    training: TrainOptions | None = None,
    revision: str | None = None,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings,
) -> dict:
    """Run decompose + train for each method (and seed and learning rate) with identical settings; write a table
    and plots.

    `settings`, by name: fields of `InitOptions` and `TrainOptions` (`seed`, `device` both; `lr` a rate, a sweep or
    "auto", see `training`), the learning-rate search's shape (`SearchSpec`: `lr_factor`, `lr_max_rates`,
    `search_keep`, `search_steps`, `lr_center`) and what the report asks (`ReportSpec`):

    - `progressive`: K: also run every method with `train(progressive=K)` (runs named METHOD-progressiveK).
    - `target_loss`: the loss for "steps to reach" (default: the highest final loss among the runs, which all of them
      reach; train and eval loss each get their own).
    - `smooth`: training losses are a trailing mean over this many steps for "final" and "steps to reach" (10).
    - `metric`: what chooses each method's learning rate and the target of "steps to reach": auto (accuracy for
      classification, pearson for regression, loss otherwise), loss, accuracy, f1, matthews, pearson, spearman;
      chosen on the eval data (without it: the final training loss).
    - `target_metric`: the value of `metric` for "steps to reach" (default: the worst final value among the methods
      at their chosen rates).
    - `baseline`: the method every other is compared with at its chosen rate, paired by seed (default lora, else the
      first method): the mean difference in `metric`, its 95% interval over seeds (`interval`: "t" or "bootstrap"), a
      verdict and the seeds that would resolve it (`statistics`).

    Args:
        model: local model directory or Hub id.
        data: training data (as for `train`: JSONL, CSV, TSV, Parquet or a `datasets` directory).
        out: output directory; must be empty unless `resume` or `overwrite`.
        methods: init methods to compare (default: lora, pissa, milora, ailora, and lora-da where it calibrates
            the model for the task: a Llama/Mistral/Qwen2 causal LM, a BERT/RoBERTa masked LM or classifier), and
            "bitfit": `train(bitfit=True)` on the model itself, no decompose; "dora":
            plain DoRA, and "METHOD+dora" (e.g. "pissa+dora"): that init with DoRA's magnitudes.
        seeds: run every method with each seed (decompose's and train's; "0,1,2" or a list); tables show the
            mean ± std over them. Default: the one `seed`.
        init: how every run's adapter starts (`InitOptions`; its `method` is replaced by each of `methods`).
        training: how every run trains (`TrainOptions`; eval_every defaults to a tenth of max_steps when there
            is eval data). `settings` replace fields of either by name (`seed`, `device` both), e.g.
            `compare(model, data, out, rank=8, max_steps=300, eval_data="eval.jsonl")`. `lr` may also be a
            sweep: a list of rates (every method runs each; the best on eval is its rate), a mapping method ->
            rate or rates, or their text form ("1e-4,5e-4,2e-3", "pissa=1e-4,lora=5e-4"), or "auto": each
            method's rate searched (`search`, shaped by the settings `lr_factor`, `lr_max_rates`, `search_keep`,
            `search_steps` and `lr_center`, defaults as `SearchSpec`'s): three rates `lr_factor` apart around its
            family's centre, extended while the best is at an edge, up to `lr_max_rates`, with the first seed and
            `search_steps` steps (default: the comparison's); then its `search_keep` best rates with every seed.
            `lr_center` replaces the family's centre of the first grid.
        revision: Hub revision of `model`.
        dry_run: check everything and return the plan (its runs and their number) without running or writing.
        resume: keep finished runs of an interrupted comparison with the same settings and continue the
            interrupted run (from its last checkpoint: use `save_every`; its time then counts the resumed part
            only). overwrite: start again.

    Returns:
        {"output", "runs": [one record per run], "summary": [one record per method and rate, mean/std over
        seeds], "best_lr": {method: rate}, "edges": {method: where its rate sits among those tried},
        "searches": {method: its search path}, "verdicts": [one per method against `baseline`], "targets",
        "report", "plots", "seconds"}; with `dry_run`: {"plan": text, "runs": [names], "bounds": (least, most)}.

    Raises:
        AiloraError: (a subclass) on bad input (methods, rates, seeds, targets, roles, files, columns, labels),
            before any run starts.

    Example:
        >>> compare("Qwen/Qwen2.5-0.5B", "train.jsonl", "cmp", eval_data="eval.jsonl", max_steps=300)  # doctest: +SKIP
    """
    started = time.perf_counter()
    plan = plan_comparison(
        model, data, methods=methods, seeds=seeds, init=init, training=training, revision=revision, settings=settings
    )
    if dry_run:
        return {"plan": describe(plan), "runs": [_name(plan, r) for r in plan.runs], "bounds": run_bounds(plan)}
    with OutputDir(out, inputs=[plan.ckpt.root], overwrite=overwrite, resume=resume, settings=plan.settings) as od:
        low, high = run_bounds(plan)
        bar = tqdm(total=low, desc="compare", unit="run", disable=not progress)
        if progress:
            tqdm.write(
                f"compare: {low} runs" if low == high else f"compare: {low} to {high} runs (--lr auto)", file=sys.stderr
            )
        records, searches = schedule(
            plan,
            lambda run: _execute(od, plan, run, bar, progress),
            lambda record: _curves(od, record),
            smooth=plan.report.smooth,
            bar=bar,
            progress=progress,
        )
        bar.close()
        result = _conclude(od, plan, records, searches)
    return {**result, "seconds": round(time.perf_counter() - started, 3)}


def _name(plan: ComparePlan, run: Run) -> str:
    """A run's directory: the rate when the method has several (or searches), the seed when several, the steps of
    a shortened search run."""
    swept_seed = run.seed if len(plan.seeds or ()) > 1 else None
    name = run_name(
        run.method, run.progressive, run.lr if plan.search or len(plan.lrs[run.method]) > 1 else None, swept_seed
    )
    return name + (f"-steps{run.steps}" if run.steps else "")


def _curves(od: OutputDir, record: dict) -> dict:
    """A run's curves (none for a run whose training failed on a non-finite loss)."""
    if record.get("failed"):
        return {"train": [], "eval": [], "metrics": {}}
    return read_curves(od.path / record["run"] / TRAINED / "metrics.jsonl")


def _execute(od: OutputDir, plan: ComparePlan, run: Run, bar, progress: bool) -> dict:
    """One run's record: decompose (shared by the method's rates and progressive variant, kept when finished), then
    train; a run an earlier comparison finished is taken from the journal. A training stopped by a non-finite
    loss is recorded as failed (it diverged), not raised."""
    swept_seed = run.seed if len(plan.seeds or ()) > 1 else None
    name = _name(plan, run)
    bar.set_postfix(run=name, refresh=False)
    if (done := od.finished(name)) is not None:
        return done
    key = run_name(run.method, None, None, swept_seed)  # shared by rates, K
    dec = _decomposed(od, plan, run, key, progress)
    base = dec["residual"] or plan.ckpt.root  # plain LoRA trains on the untouched model
    tr_dir = od.path / name / TRAINED
    again = (
        _again(tr_dir) if any((tr_dir / trainer.CKPT_DIR).glob("step-*/trainer_state.json")) else {"overwrite": True}
    )
    run_o = TrainOptions.build(
        plan.training,
        progressive=run.progressive,
        lr=run.lr,
        bitfit=run.method == BITFIT,
        **({} if run.seed is None else {"seed": run.seed}),
        **({} if run.steps is None else {"max_steps": run.steps}),
    )
    record = {
        "run": name,
        "method": run.method,
        "progressive": run.progressive,
        "lr": run.lr,
        "seed": run_o.seed,
        "search_steps": run.steps,
        "decompose_seconds": dec["seconds"],
    }
    started = time.perf_counter()
    try:
        tr = trainer.train(base, dec["adapter"], plan.data, tr_dir, options=run_o, progress=progress, **again)
    except NumericsError as e:  # a non-finite loss: the run diverged
        record.update(failed=str(e), train_seconds=time.perf_counter() - started, trainable_parameters=None, steps=None)
    else:
        record.update(train_seconds=tr["seconds"], trainable_parameters=tr["trainable_parameters"], steps=tr["steps"])
    od.mark_done(name, record)
    return record


def _decomposed(od: OutputDir, plan: ComparePlan, run: Run, key: str, progress: bool) -> dict:
    """The decompose summary a run trains from: finished earlier, run now, or none for bitfit (the model's own
    bias terms train)."""
    if run.method == BITFIT:
        return {"residual": None, "adapter": None, "seconds": 0.0}
    if (dec := od.finished(f"{key}/{DECOMPOSED}")) is not None:
        return dec
    t = plan.training
    calib = (
        {
            "data": plan.data,
            "samples": min(CALIBRATION_SAMPLES, plan.data_rows),
            "max_length": t.max_length,
            **{k: getattr(t, k) for k in TaskOptions.defaults()},
        }  # for train's task and columns
        if METHODS[init_of(run.method)[0]].needs_data
        else {}
    )  # lora-da calibrates on the training data
    method, dora = init_of(run.method)
    shared = {k: v for k, v in asdict(plan.init).items() if k != "method"}
    seeded = {} if run.seed is None else {"seed": run.seed}
    options = DecomposeOptions.build(
        None, **{**shared, **seeded, "method": method, "dora": dora}, revision=plan.revision, **calib
    )
    dec_dir = od.path / key / DECOMPOSED
    dec = pipeline.decompose(plan.model, dec_dir, options=options, progress=progress, **_again(dec_dir))
    od.mark_done(f"{key}/{DECOMPOSED}", dec)
    return dec


def _conclude(od: OutputDir, plan: ComparePlan, records: list[dict], searches: dict) -> dict:
    """Summarise the runs, test the differences, write the plots, compare.md and, last, the manifest; return
    compare's result."""
    asked, smooth = plan.report, plan.report.smooth
    curves = {r["run"]: _curves(od, r) for r in records}
    smoothed = {run: trailing_mean(c["train"], smooth) for run, c in curves.items()}
    summary, best_lr, goal = summarise(records, curves, smoothed, asked.target_loss, plan.metric, asked.target_metric)
    edges, rows = verdicts(records, summary, best_lr, plan)
    plots = write_plots(
        od, [r for r in records if r["search_steps"] is None], best_lr, curves, smoothed, goal, smooth, plan.metric
    )
    with od.open_atomic(REPORT_NAME, "w") as f:
        f.write(
            report(
                summary,
                best_lr,
                goal,
                plan.settings,
                plots,
                smooth,
                plan.metric,
                extra={"verdicts": rows, "edges": edges, "searches": searches},
            )
        )
    found = {
        "runs": records,
        "summary": summary,
        "best_lr": best_lr,
        "edges": edges,
        "searches": searches,
        "verdicts": rows,
    }
    od.write_manifest(
        COMPARE_MANIFEST,
        {
            **plan.settings,
            "methods": plan.methods,
            "progressive": asked.progressive,
            "smooth": smooth,
            "metric": plan.metric,
            "targets_loss": goal,
            **found,
            "eval_rows": plan.eval_rows,
            "plots": plots,
            "files": {"output": {f: file_digest(od.path / f) for f in [REPORT_NAME, *plots]}},
        },
    )
    return {"output": str(od.path), **found, "targets": goal, "report": str(od.path / REPORT_NAME), "plots": plots}


def _again(path: Path) -> dict:
    """How to call a sub-command on a directory an earlier compare left: resume its journal, else start over."""
    return {"resume": True} if (path / JOURNAL_NAME).is_file() else {"overwrite": True}
