"""BitFit (arXiv 2106.10199): train only the base model's bias terms, no adapter.

`train --bitfit --base MODEL` loads the task's class on MODEL, freezes every weight and trains every `.bias`
parameter (in BERT: attention, output and LayerNorm biases; Qwen2: the q/k/v biases), plus the head of a
classification model (a new classifier trains whole, as with an adapter). Llama-family models have no bias
terms: there BitFit has nothing to train, and `train` says so in one line before loading anything.

The output is the trained tensors in `bitfit_model.safetensors`, named as the task's class names its parameters
(`bert.encoder.layer.0.attention.self.query.bias`, `classifier.weight`), and the manifest `ailora-bitfit.json`
(settings, summary, the task record). `merge MODEL OUT -o MERGED` writes them into the model, streamed: only those
tensors are decoded, every other byte is copied; `load_bitfit` puts them into a loaded model. Trained biases are
not a LoRA: no server takes them as an adapter (`check` and `convert --for` say to merge).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..architectures import match
from ..distributed import full_tensor, shard_like
from ..errors import FormatError, InputNotFoundError, OptionError, UnsupportedError
from ..io.peft_adapter import Adapter
from ..io.tensorio import load_tensors
from ..manifests import BITFIT_MANIFEST
from .tasks import Task, describe_task, load_task_model

WEIGHTS_NAME = "bitfit_model.safetensors"


def bias_tensors(names) -> list[str]:
    """The bias terms among tensor or parameter `names` (those ending in `.bias`, or named `bias`)."""
    return sorted(n for n in names if n == "bias" or n.endswith(".bias"))


def check_bitfit(ckpt, *, base: object, adapter: object, bitfit: bool, progressive: int | None) -> None:
    """Refuse what BitFit cannot do, before any data or model loads.

    Raises:
        OptionError: no --adapter without --bitfit, an --adapter or --progressive with it.
        UnsupportedError: a model with no bias terms (Llama-family models).
    """
    if not bitfit:
        raise OptionError(
            "--adapter is missing: pass the initial adapter (OUT/adapter from decompose), or --bitfit "
            "to train the base model's bias terms instead"
        )
    if adapter is not None:
        raise OptionError(f"--bitfit trains the bias terms of --base itself; it takes no --adapter ({adapter})")
    if progressive is not None:
        raise OptionError("--progressive applies to adapters; leave it out with --bitfit")
    if not bias_tensors(ckpt.tensors):
        raise UnsupportedError(
            f"--bitfit: {base} has no bias terms (Llama-family models have none), so BitFit has "
            "nothing to train; train a LoRA instead (`ailora-tools decompose`, then "
            "`train --adapter`)"
        )


@dataclass
class BitFit:
    """What `train --bitfit` trains (parameter names of the task's class) and how it writes and restores them."""

    names: list[str]

    def write(self, directory: Path | None, model) -> list[Path]:
        """Write the trained tensors (float32) as `bitfit_model.safetensors` in `directory`, beside then renamed.
        Under `train --fsdp` every rank calls this (the tensors are gathered); those with no `directory` write none."""
        params = dict(model.named_parameters())
        tensors = {n: full_tensor(params[n].detach()).float().cpu().contiguous() for n in self.names}
        if directory is None:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_NAME}.partial"
        save_file(tensors, str(tmp), metadata={"format": "pt", "bitfit": "true"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        return [directory / WEIGHTS_NAME]

    def restore(self, directory: Path, model) -> None:
        """Copy the tensors a checkpoint (or output) directory holds back into `model`."""
        load_bitfit(model, directory)


def load_bitfit_model(
    task: Task, base: str | os.PathLike, *, labels: dict | None, dtype: torch.dtype
) -> tuple[torch.nn.Module, BitFit, dict]:
    """The task's class on `base` with every parameter frozen but the bias terms and the head.

    Returns:
        The model; the `BitFit` writer of its trainable parameters; the task record for the manifest.
    """
    model, heads = load_task_model(task, base, labels=labels, dtype=dtype)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias") or any(name.startswith(h + ".") for h in heads))
        if p.requires_grad:
            p.data = p.data.float()  # trainable tensors in float32, as PEFT keeps adapters
            names.append(name)
    record = describe_task(task, model, heads, labels)
    record["config"] = record["config"] or {"architectures": [type(model).__name__]}  # what `merge` writes
    return model, BitFit(names), record


def is_bitfit(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a `train --bitfit` output (its manifest or its tensors file is there)."""
    d = Path(directory)
    return (d / BITFIT_MANIFEST).is_file() or (
        (d / WEIGHTS_NAME).is_file() and not (d / "adapter_config.json").exists()
    )


def read_bitfit(directory: str | os.PathLike) -> Adapter:
    """A BitFit output as an adapter with no LoRA factors: its tensors are `extra`, which `merge` writes over the
    base's (by the base's names, whatever base model prefix either side carries), as it writes a trained head.

    Raises:
        InputNotFoundError, FormatError: no tensors file, or one that cannot be read.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise InputNotFoundError(f"{directory}: no {WEIGHTS_NAME}; pass the output of `train --bitfit`")
    tensors = load_tensors(path)
    manifest = Path(directory) / BITFIT_MANIFEST
    record = json.loads(manifest.read_text()).get("task") if manifest.is_file() else None
    return Adapter(
        {"bitfit": True, "base_model_name_or_path": None, "modules_to_save": (record or {}).get("modules_to_save")},
        {},
        tensors,
    )


def load_bitfit(model, directory: str | os.PathLike) -> None:
    """Copy a BitFit output's tensors into a loaded model (e.g. `AutoModelForSequenceClassification` on the base).

    Raises:
        FormatError: a tensor the model has no parameter for, or of another shape.

    Example:
        >>> load_bitfit(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"), "bitfit-out")  # doctest: +SKIP
    """
    tensors = read_bitfit(directory).extra
    params = dict(model.named_parameters())
    found = match(tensors, params, prefix=getattr(model, "base_model_prefix", None) or None)
    lost = sorted(set(tensors) - set(found))
    if lost:
        raise FormatError(
            f"{directory}: tensor {lost[0]!r} is no parameter of {type(model).__name__}; load the "
            "class it was trained on (its ailora-bitfit.json names it: task.model_class)"
        )
    with torch.no_grad():
        for name, target in found.items():
            if params[target].shape != tensors[name].shape:
                raise FormatError(
                    f"{directory}: {name} is {tuple(tensors[name].shape)} but the model's "
                    f"{target} is {tuple(params[target].shape)}; load the base it was trained on"
                )
            params[target].copy_(shard_like(params[target], tensors[name]))
