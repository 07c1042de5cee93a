"""A minimal trainer for an adapter on its frozen base; reads top to bottom: setup, train, save.

Only the LoRA factors train (transformers model + PEFT), and for sequence classification the head
(`tasks`: which class, data, head and metric each task has). The base is decompose's residual, or the
ORIGINAL model with the initial product subtracted inside the adapter (`initial_offset`, exact for
16-bit checkpoints). `progressive` trains in Progtuning stages (`progressive`). Checkpoints hold adapter,
optimizer, scheduler, RNG state and data position (safetensors + JSON, no pickle), so `resume` continues
exactly. The output is a PEFT adapter directory plus `ailora-train.json`, which names the initial adapter
(so that `convert` needs no other argument) and records the task.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import __version__
from ..io.checkpoint import Checkpoint
from ..io.examples import check_rows
from ..errors import InputNotFoundError, NumericsError
from ..io.hashing import file_digest
from .exact_mode import resolve_adapter_base, subtract_initial
from ..architectures import match
from ..options import at_least, choice, positive
from ..io.output import OutputDir
from ..io.peft_adapter import Adapter, adapter_of, load_into, read_adapter, write_adapter
from .progressive import Progressive
from ..manifests import TRAIN_MANIFEST, check_base, train_identity
from ..devices import resolve_device
from .tasks import evaluate as run_eval
from .tasks import load_data, load_model, resolve_task
from ..io.tokenizer import load_tokenizer

SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16")
CKPT_DIR = "checkpoints"


def train(
    base: str | os.PathLike, adapter: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
    eval_data: str | os.PathLike | None = None, epochs: int = 1, max_steps: int | None = None, lr: float = 2e-4,
    batch_size: int = 4, grad_accum: int = 1, max_length: int = 512, warmup: int = 0, scheduler: str = "cosine",
    seed: int = 0, save_every: int | None = None, eval_every: int | None = None, resume: bool = False,
    device: str = "auto", dtype: str = "auto", tokenizer: str | os.PathLike | None = None,
    progressive: int | None = None, adapter_base: str = "auto", task: str = "auto", num_labels: int | None = None,
    overwrite: bool = False, progress: bool = True, force: bool = False,
) -> dict:
    """Train `adapter` on the frozen `base` and write a PEFT adapter directory to `out`.

    Args:
        base: the residual model directory, or the original model when the adapter trains on it
            (`decompose --no-residual`; see `adapter_base`).
        adapter: the initial adapter (e.g. OUT/adapter from decompose).
        data, eval_data: JSONL files (`data`: {"text"}, {"prompt","completion"} or {"messages"} for causal LM;
            {"text"} for masked LM; {"text", "label"} or {"text_a", "text_b", "label"} for classification).
        epochs, max_steps: length of training (max_steps wins when given); a step is one optimizer update.
        lr, batch_size, grad_accum, max_length, warmup, scheduler: the usual; warmup in steps.
        seed: seeds model-side randomness and the data order.
        save_every, eval_every: checkpoint / eval period in steps (a checkpoint is always saved at the end).
        resume: continue from the latest checkpoint in `out`.
        device: auto, cpu, cuda, cuda:N. dtype: auto (bfloat16 autocast on CUDA, float32 on CPU),
            float32 or bfloat16.
        tokenizer: directory or Hub id of the tokenizer (default: the base's own files).
        progressive: Progtuning with this many stages (see `progressive`); None trains every block throughout.
        adapter_base: "auto" (as decompose's manifest records), "residual" (the model is base + s·B·A) or
            "original" (base + s(B·A − B0·A0), exact; `base` must be the original model).
        task: causal-lm, masked-lm, sequence-classification, or auto (what the base was saved for; `tasks`).
        num_labels: classes of a new classification head (default: from the labels).
        force: train although `base` is not the model the adapter's manifests record (a warning in the output's
            manifest); without it that is refused.

    Returns:
        Summary: steps, first and last training loss, eval loss (and accuracy for classification), tokens/s,
        seconds, output path, and with `progressive` each stage's blocks, steps and tokens/s and the fraction
        of updated parameter-steps.

    Example:
        >>> train("out/residual", "out/adapter", "train.jsonl", "trained", max_steps=100)  # doctest: +SKIP
    """
    # ---- setup: every option, file and data row checked before the model loads ----------------------
    started = time.perf_counter()
    choice("--scheduler", scheduler, SCHEDULERS)
    choice("--dtype", dtype, DTYPES)
    for flag, value in (("--epochs", epochs), ("--max-steps", max_steps), ("--batch-size", batch_size),
                        ("--grad-accum", grad_accum), ("--save-every", save_every), ("--eval-every", eval_every)):
        at_least(flag, value, 1)
    at_least("--max-length", max_length, 2)  # one token to predict from, one to predict
    at_least("--warmup", warmup, 0)
    positive("--lr", lr)
    if not Path(base).is_dir():
        raise InputNotFoundError(f"--base {base}: no such model directory")
    ckpt = Checkpoint.open(base)
    job = resolve_task(task, ckpt.config)
    for flag, path in (("--data", data), ("--eval-data", eval_data)):
        if path is not None:
            check_rows(path, flag=flag, task=job.name)
    from transformers import get_scheduler

    dev = resolve_device(device)
    autocast = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    initial = read_adapter(adapter)
    initial.check_fits(ckpt.tensors, adapter=adapter, base=base, config=ckpt.config)
    mode = resolve_adapter_base(adapter_base, adapter)
    warning = check_base(adapter, ckpt, flag="--base", force=force)
    tok, pad_id = load_tokenizer(tokenizer or base, flag="--tokenizer" if tokenizer else "--base")
    ds = load_data(job, data, eval_data, tok, pad_id=pad_id, config=ckpt.config, base=base, max_length=max_length,
                   seed=seed, num_labels=num_labels)
    examples, evals = ds.train, ds.eval
    steps_per_epoch = math.ceil(len(examples) / (batch_size * grad_accum))
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    settings = {"tool": __version__, "base": str(Path(base).absolute()), "initial_adapter": str(Path(adapter).absolute()),
                "data": str(Path(data).absolute()), "eval_data": str(Path(eval_data).absolute()) if eval_data else None,
                "steps": total, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length,
                "warmup": warmup, "scheduler": scheduler, "seed": seed, "dtype": dtype,
                "tokenizer": str(tokenizer) if tokenizer else None, "progressive": progressive,
                # "residual": trained as base + s·B·A; "original": as base + s(B·A − B0·A0), what convert writes
                "adapter_base": mode, "mode": "exact" if mode == "original" else "residual",
                "task": job.name, "labels": ds.labels, **train_identity(adapter, ckpt, mode, data, eval_data, warning)}
    torch.manual_seed(seed)  # a new classification head is initialised from it
    # frozen base in bfloat16 on CUDA (half the memory); PEFT keeps the trainable factors in float32
    model, config, task_info = load_model(job, base, adapter, labels=ds.labels,
                                       dtype=torch.bfloat16 if autocast else torch.float32)
    model = model.to(dev)
    if mode == "original":  # the initial factors under the model class's module names
        names = match(initial.factors, {n for n, _ in model.get_base_model().named_modules()},
                      prefix=task_info["base_model_prefix"])
        subtract_initial(model, Adapter(initial.config, {names[m]: f for m, f in initial.factors.items()}))
    params = [p for p in model.parameters() if p.requires_grad]
    stages = Progressive(model, stages=progressive, total_steps=total) if progressive else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    state = {"step": 0, "epoch": 0, "pos": 0}

    def next_batch():
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100003 + state["epoch"]))
        idx = order[state["pos"]: state["pos"] + batch_size].tolist()
        state["pos"] += batch_size
        if state["pos"] >= len(examples):
            state["epoch"], state["pos"] = state["epoch"] + 1, 0
        return {k: v.to(dev) for k, v in ds.collate([examples[i] for i in idx]).items()}

    def evaluate() -> dict[str, float]:  # eval_loss, and eval_accuracy for classification
        return run_eval(model, job, evals, ds.collate, batch_size=batch_size, device=dev, autocast=autocast)

    with OutputDir(out, inputs=[Path(base), Path(adapter)], overwrite=overwrite, resume=resume,
                   settings=settings) as od:
        metrics_path = od.path / "metrics.jsonl"
        if resume and (latest := _latest_checkpoint(od.path)) is not None:
            _restore(latest, model, optimizer, sched, state)
            _truncate_metrics(metrics_path, state["step"])
        if state["step"] > 0:  # resumed: the start is the first run's step-0 evaluation, not this step's
            eval_start = _start_eval(metrics_path) if evals else None
        else:
            eval_start = evaluate() if evals else None
            if eval_start is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": 0, **eval_start}) + "\n")
        # ---- train ---------------------------------------------------------------------------------
        model.train()
        bar = tqdm(total=total, initial=state["step"], desc="train", disable=not progress)
        while state["step"] < total:
            stage = stages.enter(state["step"]) + 1 if stages else None  # freezes the blocks this stage leaves
            step_loss, tokens, t0 = 0.0, 0, time.perf_counter()
            for _ in range(grad_accum):
                batch = next_batch()
                tokens += int(batch["attention_mask"].sum())
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    loss = model(**batch).loss / grad_accum
                loss.backward()
                step_loss += float(loss.detach())
            if not math.isfinite(step_loss):
                raise NumericsError(f"step {state['step'] + 1}: the training loss is {step_loss}; lower --lr, use "
                                    "--dtype float32, or check the data (the output has no manifest)")
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            state["step"] += 1
            if stages:
                state["stage"] = stage  # recorded in checkpoints; on resume the schedule resumes from the step
            record = {"step": state["step"], "loss": step_loss, "lr": sched.get_last_lr()[0], "tokens": tokens,
                      "seconds": round(time.perf_counter() - t0, 4), **({"stage": stage} if stages else {})}
            if evals and eval_every and state["step"] % eval_every == 0:
                record.update(evaluate())
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            bar.update(1)
            if save_every and state["step"] % save_every == 0 and state["step"] < total:
                _save_checkpoint(od, model, optimizer, sched, state, config)
        bar.close()
        # ---- save ----------------------------------------------------------------------------------
        _save_checkpoint(od, model, optimizer, sched, state, config)
        written = _write(od.path, adapter_of(model, config))
        eval_end = evaluate() if evals else None
        if eval_end is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": state["step"], **eval_end, "final": True}) + "\n")
        history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        train_losses = [r["loss"] for r in history if "loss" in r]
        summary = {"output": str(od.path), "steps": state["step"], "first_loss": train_losses[0] if train_losses else None,
                   "last_loss": train_losses[-1] if train_losses else None,
                   **{f"{k}_start": v for k, v in (eval_start or {"eval_loss": None}).items()},
                   **(eval_end or {"eval_loss": None}), "adapter_base": mode,
                   "trainable_parameters": sum(p.numel() for p in params), "tokens_per_s": _tokens_per_s(history)}
        if stages:
            summary["progressive"] = {
                "stages": [{**s, "tokens_per_s": _tokens_per_s([r for r in history if r.get("stage") == s["stage"]])}
                           for s in stages.describe()],
                "updated_parameter_fraction": stages.updated_fraction()}
        od.write_manifest(TRAIN_MANIFEST, {**settings, "summary": summary, "task": task_info,
                                           "files": {"output": {p.name: file_digest(p) for p in written}}})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _tokens_per_s(records: list[dict]) -> float | None:
    seconds = sum(r.get("seconds", 0.0) for r in records)
    return round(sum(r.get("tokens", 0) for r in records) / seconds, 1) if seconds else None


def _write(directory: Path, trained: Adapter) -> list[Path]:
    return write_adapter(directory, trained.config, trained.factors, extra=trained.extra)


def _save_checkpoint(od: OutputDir, model, optimizer, sched, state: dict, config: dict) -> None:
    """checkpoints/step-N/: adapter, optimizer tensors + RNG (safetensors), trainer_state.json last."""
    rel = f"{CKPT_DIR}/step-{state['step']:07d}"
    tmp = od.partial(rel)
    shutil.rmtree(tmp, ignore_errors=True)
    _write(tmp, adapter_of(model, config))
    opt = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(
        {**state, "param_groups": opt["param_groups"], "scheduler": sched.state_dict()}, default=str))
    shutil.rmtree(od.path / rel, ignore_errors=True)
    od.publish(rel)


def _latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CKPT_DIR).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _restore(ckpt: Path, model, optimizer, sched, state: dict) -> None:
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    load_into(model, read_adapter(ckpt), source=ckpt)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state.update({k: saved[k] for k in ("step", "epoch", "pos", "stage") if k in saved})


def _start_eval(metrics_path: Path) -> dict[str, float] | None:
    """The step-0 evaluation a resumed run's metrics.jsonl holds (None if it has none)."""
    for line in metrics_path.read_text().splitlines() if metrics_path.is_file() else []:
        record = json.loads(line)
        if record.get("step") == 0:
            return {k: v for k, v in record.items() if k.startswith("eval_")}
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step
                and not json.loads(line).get("final")]
        path.write_text("".join(line + "\n" for line in keep))
