"""A minimal trainer for an adapter on its frozen base; reads top to bottom: setup, train, save.

Only the LoRA factors train (transformers model + PEFT), and for sequence classification the head
(`tasks`: which class, data, head and metric each task has). The base is decompose's residual, or the
ORIGINAL model with the initial product subtracted inside the adapter (`exact_mode`, exact for
16-bit checkpoints). `progressive` trains in Progtuning stages (`progressive`); `bitfit` trains no adapter but the
base's own bias terms (`bitfit`). The pieces: `setup` (options,
data, model, optimizer, schedule), `loop` (the steps), `checkpointer` (metrics.jsonl and resumable checkpoints),
`data_parallel` (under torchrun: each rank its slice of every micro-batch; rank 0 writes).
The output is a PEFT adapter directory plus `ailora-train.json`, which names the initial adapter (so that
`convert` needs no other argument) and records the task.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from ..errors import AiloraWarning
from ..io.hashing import file_digest
from ..io.output import OutputDir, finished_run
from ..manifests import BITFIT_MANIFEST, TRAIN_MANIFEST
from ..options import TrainOptions
from .checkpointer import (
    CKPT_DIR,
    METRICS,
    Checkpointer,
    Metrics,
    recorded,
    tokens_per_s,
    write,
)
from .loop import evaluate, train_steps
from .setup import prepare

__all__ = ["train", "CKPT_DIR"]


def train(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None,
    data: str | os.PathLike,
    out: str | os.PathLike,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force: bool = False,
    **settings,
) -> dict:
    """Train `adapter` on the frozen `base` and write a PEFT adapter directory to `out`.

    Args:
        base: the residual model directory, or the original model when the adapter trains on it
            (`decompose --no-residual`; see `TrainOptions.adapter_base`).
        adapter: the initial adapter (e.g. OUT/adapter from decompose); None with `bitfit` (`TrainOptions.bitfit`:
            the base's own bias terms train, written as `bitfit_model.safetensors` + `ailora-bitfit.json`).
        data: training data, JSONL, CSV, TSV, Parquet or a `datasets` directory ({"text"}, {"prompt","completion"}
            or {"messages"} for causal LM; {"text"} for masked LM; {"text", "label"} or {"text_a", "text_b",
            "label"} for classification; other column names with `text_column`, `text_pair_column`,
            `label_column`).
        options: a `TrainOptions` (every field documented there); `settings` replace its fields by name
            (`train(base, adapter, data, out, max_steps=100, lr=1e-4)`).
        resume: continue from the latest checkpoint in `out`; with none there (no such directory, or killed
            before its first checkpoint) start a fresh run and say so (an `AiloraWarning`); a run that finished
            there with the same settings is left as it is and its summary returned ("resume": "complete, nothing
            to do"), so that a job resubmitted with `--resume` succeeds. overwrite: start again.
            progress: a tqdm bar.
        force: train although `base` is not the model the adapter's manifests record (fingerprints); the
            manifest then records the warning. Without it that is refused.

    Returns:
        Summary: steps, first and last training loss, eval loss (and the classification metrics), tokens/s,
        seconds, output path, and with `progressive` each stage's blocks, steps and tokens/s and the fraction
        of updated parameter-steps. Ranks ≥ 1 of a torchrun launch (`data_parallel`) write nothing and return
        {"worker": rank, "steps", "seconds"}.

    Raises:
        AiloraError: (a subclass) on bad input, before the model loads.

    Example:
        >>> train("out/residual", "out/adapter", "train.jsonl", "trained", max_steps=100)  # doctest: +SKIP
    """
    # ---- setup: every option, file and data row checked before the model loads ----------------------
    started = time.perf_counter()
    o = TrainOptions.build(options, **settings)
    run = prepare(base, adapter, data, o, force=force)
    state = {"step": 0, "epoch": 0, "pos": 0}
    manifest = BITFIT_MANIFEST if o.bitfit else TRAIN_MANIFEST
    recorded_settings = {**run.settings, "task": run.task_info}  # as the manifest records them
    if (
        done := run.ranks.broadcast(
            finished_run(out, manifest, recorded_settings) if resume and not overwrite and run.ranks.writes else None
        )
    ) is not None:
        return _nothing_to_do(run, done, out, started)
    if not run.ranks.writes:  # ranks ≥ 1 of a torchrun launch: the same steps on their rows; rank 0 writes
        return _follow(run, state, started)
    with OutputDir(
        out, inputs=[Path(p) for p in (base, adapter) if p], overwrite=overwrite, resume=resume, settings=run.settings
    ) as od:
        metrics = Metrics(od.path / METRICS)
        checkpointer = Checkpointer(od, run.model, run.optimizer, run.scheduler, run.config)
        eval_start = _start(run, od, checkpointer, metrics, state, resume=resume)
        # ---- train ---------------------------------------------------------------------------------
        train_steps(run, state, metrics, checkpointer, progress=progress)
        # ---- save ----------------------------------------------------------------------------------
        checkpointer.save(state)
        written = write(od.path, run.model, run.config)
        if (eval_end := evaluate(run)) is not None:
            metrics.append({"step": state["step"], **eval_end, "final": True})
        summary = _summary(run, od.path, state, eval_start, eval_end, metrics.history())
        od.write_manifest(
            manifest,
            {
                **recorded_settings,
                "options": asdict(o),
                "summary": summary,
                "files": {"output": {p.name: file_digest(p) for p in written}, CKPT_DIR: recorded(od.path)},
            },
        )
    run.ranks.close()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _start(
    run, od: OutputDir, checkpointer: Checkpointer, metrics: Metrics, state: dict, *, resume: bool
) -> dict | None:
    """Restore the latest checkpoint (with --resume) into `state`, or start fresh; the evaluation at step 0 (the
    first run's, when resumed)."""
    if (latest := run.ranks.broadcast(checkpointer.latest() if resume else None)) is not None:
        checkpointer.restore(latest, state)
    elif resume:
        warnings.warn(
            AiloraWarning(f"--resume: nothing to resume in {od.path} (no checkpoint there): starting a fresh run"),
            stacklevel=3,
        )
    metrics.truncate(state["step"] or -1)  # what this run writes again: all of it when it starts at step 0
    if state["step"] > 0:  # resumed: the start is the first run's step-0 evaluation, not this step's
        return metrics.start_eval()
    if (eval_start := evaluate(run)) is not None:
        metrics.append({"step": 0, **eval_start})
    return eval_start


def _summary(
    run, output: Path, state: dict, eval_start: dict | None, eval_end: dict | None, history: list[dict]
) -> dict:
    """Steps, first and last loss, evaluations at the start and the end, throughput, and the hooks' reports."""
    losses = [r["loss"] for r in history if "loss" in r]
    summary = {
        "output": str(output),
        "steps": state["step"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        **{f"{k}_start": v for k, v in (eval_start or {"eval_loss": None}).items()},
        **(eval_end or {"eval_loss": None}),
        "adapter_base": run.mode,
        "trainable_parameters": sum(p.numel() for p in run.params),
        "tokens_per_s": tokens_per_s(history),
        "processes": run.ranks.world,
    }
    for hook in run.hooks:
        summary.update(hook.report(history))
    return summary


def _nothing_to_do(run, done: dict, out, started: float) -> dict:
    """`--resume` of a run that finished with these settings: its summary, every file as it is."""
    run.ranks.close()
    seconds = round(time.perf_counter() - started, 3)
    if not run.ranks.writes:
        return {"worker": run.ranks.rank, "steps": done["summary"]["steps"], "seconds": seconds}
    warnings.warn(
        AiloraWarning(f"--resume: the run in {Path(out).absolute()} is complete, nothing to do"), stacklevel=3
    )
    return {**done["summary"], "resume": "complete, nothing to do", "seconds": seconds}


def _follow(run, state: dict, started: float) -> dict:
    """A rank ≥ 1: restore the checkpoint rank 0 resumes from, train its share of each step, write nothing. With
    --fsdp it holds a shard of the model, so it evaluates and gathers whenever rank 0 does."""
    checkpointer = Checkpointer(None, run.model, run.optimizer, run.scheduler, run.config)
    if (latest := run.ranks.broadcast(None)) is not None:
        checkpointer.restore(latest, state)
    run.ranks.fork_rng(run.options.seed, state["step"])
    sharded = run.options.fsdp
    if sharded and state["step"] == 0:
        evaluate(run)
    train_steps(run, state, None, checkpointer if sharded else None, progress=False)
    if sharded:
        checkpointer.save(state)
        write(None, run.model, run.config)
        evaluate(run)
    run.ranks.close()
    return {"worker": run.ranks.rank, "steps": state["step"], "seconds": round(time.perf_counter() - started, 3)}
