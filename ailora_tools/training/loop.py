"""The training loop: micro-batches, one optimizer step, one metrics record per step, checkpoints on schedule.

Step hooks (`Run.hooks`, such as Progtuning's stages) run before each step and add fields to its record, so the
loop itself has no special cases.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..errors import NumericsError
from .checkpointer import Checkpointer, Metrics
from .setup import Run
from .tasks import evaluate as run_eval


def evaluate(run: Run) -> dict[str, float] | None:
    """eval_loss (and for classification eval_accuracy, eval_f1, eval_matthews, or for regression eval_pearson,
    eval_spearman) on the eval data; None without eval data."""
    if not run.data.eval:
        return None
    return run_eval(
        run.model,
        run.task,
        run.data.eval,
        run.data.collate,
        batch_size=run.options.batch_size,
        device=run.device,
        autocast=run.autocast,
    )


def next_batch(run: Run, state: dict) -> dict[str, torch.Tensor]:
    """The next micro-batch (all ranks' rows, on the CPU): each epoch in its own seeded order, the position kept
    in `state` for --resume."""
    examples, size = run.data.train, run.options.batch_size
    order = torch.randperm(
        len(examples), generator=torch.Generator().manual_seed(run.options.seed * 100003 + state["epoch"])
    )
    idx = order[state["pos"] : state["pos"] + size].tolist()
    state["pos"] += size
    if state["pos"] >= len(examples):
        state["epoch"], state["pos"] = state["epoch"] + 1, 0
    return run.data.collate([examples[i] for i in idx])


def train_steps(
    run: Run, state: dict, metrics: Metrics | None, checkpointer: Checkpointer | None, *, progress: bool
) -> None:
    """Run optimizer steps from `state["step"]` to `run.total`, a record each, a checkpoint every --save-every.
    Ranks ≥ 1 of a torchrun launch (`metrics` None) compute their share and write nothing; their `checkpointer`
    (None, or with --fsdp one with no output) takes part in gathering what rank 0 saves.

    Raises:
        NumericsError: a non-finite training loss (the output then has no manifest).
    """
    o, model, ranks = run.options, run.model, run.ranks
    model.train()
    bar = tqdm(total=run.total, initial=state["step"], desc="train", disable=not progress)
    while state["step"] < run.total:
        extra = {}
        for hook in run.hooks:  # freezes the blocks a Progtuning stage leaves, for example
            extra.update(hook.before_step(state["step"]))
        step_loss, tokens, t0 = 0.0, 0, time.perf_counter()
        for _ in range(o.grad_accum):
            batch = next_batch(run, state)
            part, share = ranks.shard(batch, run.task.loss_weight(batch["labels"]), run.task.loss_weight)
            tokens += int(part["attention_mask"].sum()) if share else 0
            with torch.autocast("cuda", torch.bfloat16, enabled=run.autocast):
                loss = model(**{k: v.to(run.device) for k, v in part.items()}).loss * share / o.grad_accum
            (loss * ranks.world if o.fsdp else loss).backward()  # FSDP averages the gradients over the ranks
            step_loss += float(loss.detach())
        summed = [] if o.fsdp else [p for p in run.params if p.requires_grad]  # --fsdp: FSDP sums the gradients
        step_loss, tokens = ranks.sum_gradients(summed, step_loss, tokens)
        tokens = int(tokens)
        if not math.isfinite(step_loss):
            raise NumericsError(
                f"step {state['step'] + 1}: the training loss is {step_loss}; lower --lr, use "
                "--dtype float32, or check the data (the output has no manifest)"
            )
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        state["step"] += 1
        state.update(extra)  # recorded in checkpoints
        record = {
            "step": state["step"],
            "loss": step_loss,
            "lr": run.scheduler.get_last_lr()[0],
            "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 4),
            **extra,
        }
        # ranks ≥ 1 record nothing, and evaluate and save only with --fsdp, where each holds a shard of the model
        if o.eval_every and state["step"] % o.eval_every == 0 and (metrics is not None or o.fsdp):
            record.update(evaluate(run) or {})
        if metrics is not None:
            metrics.append(record)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        bar.update(1)
        if o.save_every and state["step"] % o.save_every == 0 and state["step"] < run.total and checkpointer:
            checkpointer.save(state)
    bar.close()
