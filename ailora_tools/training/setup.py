"""Training setup: every option, file and data row checked, then the model, data, optimizer and schedule.

Nothing here trains; `prepare` returns a `Run` that `loop.train_steps` drives. The base is decompose's
residual, or the ORIGINAL model with the initial product subtracted inside the adapter (`exact_mode`), or for a
`decompose --no-offset` adapter the ORIGINAL model as it is (step 0 = the model + s·B0·A0).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..architectures import match
from ..devices import resolve_device
from ..distributed import launched, use_local_gpu
from ..errors import InputNotFoundError, OptionError
from ..io.checkpoint import Checkpoint
from ..io.examples import check_data
from ..io.peft_adapter import Adapter, read_adapter
from ..io.tokenizer import load_tokenizer
from ..lineage import train_identity
from ..manifests import NO_OFFSET, check_base, frozen_factors, starts_offset
from ..options import TrainOptions
from .bitfit import BitFit, check_bitfit, load_bitfit_model
from .data_parallel import Ranks
from .exact_mode import resolve_adapter_base, subtract_initial
from .experts import linear_offsets
from .progressive import Progressive
from .tasks import Data, Task, load_data, load_model, resolve_task


@dataclass
class Run:
    """Everything a training run holds: what `loop.train_steps` drives and the checkpointer saves."""

    options: TrainOptions
    task: Task
    data: Data
    model: torch.nn.Module
    config: dict | BitFit  # the adapter config written with every checkpoint (BitFit: which biases train)
    task_info: dict  # the model class and names, for the manifest
    device: torch.device
    autocast: bool  # bfloat16 autocast (CUDA with --dtype auto|bfloat16)
    mode: str | None  # "residual" or "original" (exact mode); None for BitFit
    total: int  # optimizer steps
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    settings: dict  # what --resume compares; the manifest records it with the options
    ranks: Ranks  # this process's rank and the number of ranks (torchrun); Ranks() for one process
    #: step hooks (Progtuning): `before_step(step) -> dict` adds fields to the step's record
    hooks: list = field(default_factory=list)


def check(base: str | os.PathLike, data: str | os.PathLike, o: TrainOptions) -> tuple[Checkpoint, Task]:
    """The base and every data row, before anything loads. Raises AiloraError subclasses."""
    if not Path(base).is_dir():
        raise InputNotFoundError(f"--base {base}: no such model directory")
    ckpt = Checkpoint.open(base)
    task = resolve_task(o.task, ckpt.config)
    check_data(task.name, data, o.eval_data, columns=o.columns, num_labels=o.num_labels, config=ckpt.config, base=base)
    if o.fsdp and not launched():
        raise OptionError(
            "--fsdp shards the model across the processes torchrun starts: launch with `torchrun "
            "--nproc-per-node N -m ailora_tools.cli train ...`, or leave --fsdp out"
        )
    if o.fsdp and o.progressive:
        raise OptionError("--fsdp with --progressive is not supported: leave one of them out")
    return ckpt, task


def prepare(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None,
    data: str | os.PathLike,
    o: TrainOptions,
    *,
    force: bool = False,
) -> Run:
    """Check everything, then load the model with the initial adapter, the data, the optimizer and the schedule.
    `force`: train although `base` is not the model the adapter's manifests record (a warning in the manifest)."""
    ckpt, task = check(base, data, o)
    use_local_gpu(o.device)  # under torchrun: "auto" and "cuda" are this rank's GPU
    dev = resolve_device(o.device)
    autocast = dev.type == "cuda" and o.dtype in ("auto", "bfloat16")
    initial, mode, warning = _initial_adapter(ckpt, base, adapter, o, force=force)
    # exact mode subtracts s·B0·A0 on the original; a --no-offset adapter trains as it is, like a plain LoRA
    exact = mode == "original" and starts_offset(adapter)
    ds, total = _read_data(task, base, data, o, ckpt)
    # adapter_base "residual": trained as base + s·B·A; "original": as base + s(B·A − B0·A0), what convert writes
    settings = {
        **_settings(base, adapter, data, o, total),
        "adapter_base": mode,
        "mode": "bitfit" if o.bitfit else "exact" if exact else NO_OFFSET if mode == "original" else "residual",
        "task": task.name,
        "labels": ds.labels,
        **({"frozen": list(fixed)} if adapter and (fixed := frozen_factors(adapter)) else {}),  # MiCA's B
        **train_identity(adapter, ckpt, mode, data, o.eval_data, warning),
    }
    torch.manual_seed(o.seed)  # a new classification head is initialised from it
    ranks = Ranks.start(dev, fsdp=o.fsdp)
    model, config, task_info = _load_model(task, base, adapter, ds, o, dev, ranks, autocast=autocast)
    if exact:
        _subtract_initial(model, initial, task_info, ckpt.config, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [Progressive(model, stages=o.progressive, total_steps=total)] if o.progressive else []
    optimizer, scheduler = _optimizer(model, o, total)
    return Run(
        o,
        task,
        ds,
        model,
        config,
        task_info,
        dev,
        autocast,
        mode,
        total,
        params,
        optimizer,
        scheduler,
        settings,
        ranks,
        hooks,
    )


def _initial_adapter(ckpt: Checkpoint, base, adapter, o: TrainOptions, *, force: bool) -> tuple:
    """(the initial adapter, the base it trains on: "residual" or "original", the --force warning); all None for
    BitFit, after its checks."""
    if o.bitfit or adapter is None:  # BitFit: the base's own bias terms train, no adapter (`bitfit`)
        check_bitfit(ckpt, base=base, adapter=adapter, bitfit=o.bitfit, progressive=o.progressive)
        return None, None, None
    initial = read_adapter(adapter, dora=True)
    initial.check_fits(ckpt.tensors, adapter=adapter, base=base, config=ckpt.config, takes_nf4=True)
    mode = resolve_adapter_base(o.adapter_base, adapter)
    return initial, mode, check_base(adapter, ckpt, flag="--base", force=force)


def _read_data(task: Task, base, data, o: TrainOptions, ckpt: Checkpoint) -> tuple[Data, int]:
    """The training (and evaluation) examples, tokenized; the number of optimizer steps they make."""
    tok, pad_id = load_tokenizer(o.tokenizer or base, flag="--tokenizer" if o.tokenizer else "--base")
    ds = load_data(
        task,
        data,
        o.eval_data,
        tok,
        pad_id=pad_id,
        config=ckpt.config,
        base=base,
        max_length=o.max_length,
        seed=o.seed,
        num_labels=o.num_labels,
        columns=o.columns,
    )
    total = (
        o.max_steps if o.max_steps is not None else o.epochs * math.ceil(len(ds.train) / (o.batch_size * o.grad_accum))
    )
    return ds, total


def _subtract_initial(model, initial: Adapter, task_info: dict, config: dict, adapter) -> None:
    """Exact mode: the initial product subtracted inside the adapter, its factors under the model class's names
    (experts: B0 = 0, nothing to subtract)."""
    offsets = linear_offsets(initial, config, source=adapter)
    names = match(
        offsets, {n for n, _ in model.get_base_model().named_modules()}, prefix=task_info["base_model_prefix"]
    )
    subtract_initial(model, Adapter(initial.config, {names[m]: f for m, f in offsets.items()}))


def _settings(base, adapter, data, o: TrainOptions, total: int) -> dict:
    """The run's settings as the manifest records them (paths absolute), less the adapter base, mode and task."""
    return {
        "tool": __version__,
        "base": str(Path(base).absolute()),
        "initial_adapter": str(Path(adapter).absolute()) if adapter else None,
        "data": str(Path(data).absolute()),
        "eval_data": str(Path(o.eval_data).absolute()) if o.eval_data else None,
        "steps": total,
        "lr": o.lr,
        "batch_size": o.batch_size,
        "grad_accum": o.grad_accum,
        "max_length": o.max_length,
        "warmup": o.warmup_steps(total),
        "scheduler": o.scheduler,
        "seed": o.seed,
        "weight_decay": o.weight_decay,
        "columns": [o.text_column, o.text_pair_column, o.label_column],
        "dtype": o.dtype,
        "tokenizer": o.tokenizer,
        "progressive": o.progressive,
    }


def _load_model(task: Task, base, adapter, ds: Data, o: TrainOptions, dev, ranks: Ranks, *, autocast: bool) -> tuple:
    """(the model with its trainable parts on `dev`, or sharded under --fsdp; its config; the task's record)."""
    # frozen base in bfloat16 on CUDA (half the memory); PEFT keeps the trainable factors in float32
    frozen = torch.bfloat16 if autocast else torch.float32
    with ranks.in_turn(o.fsdp):  # --fsdp: one rank at a time holds the whole base, until it keeps its shards
        model, config, task_info = (
            load_bitfit_model(task, base, labels=ds.labels, dtype=frozen)
            if o.bitfit
            else load_model(task, base, adapter, labels=ds.labels, dtype=frozen)
        )
        if o.gradient_checkpointing:  # non-reentrant: no input needs requires_grad; the blocks' hooks run again
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if o.fsdp:
            ranks.shard_model(model)
        else:
            model = model.to(dev)
    return model, config, task_info


def _optimizer(model: torch.nn.Module, o: TrainOptions, total: int) -> tuple:
    """AdamW over the trainable parameters (decay groups) and the learning-rate schedule over `total` steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(decay_groups(model, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay)
    scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps(total), num_training_steps=total)
    return optimizer, scheduler


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """The trainable parameters as AdamW takes them: with weight decay, as transformers' Trainer (which LoRA's GLUE
    scripts run) groups them, biases and LayerNorm weights without decay; without, one list."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [p for _, p in trainable]
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    exempt = {n for n, p in trainable if n.endswith("bias") or id(p) in norms}
    groups = [
        {"params": [p for n, p in trainable if n not in exempt], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
