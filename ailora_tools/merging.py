"""Merge a LoRA adapter into full weights, streaming: W' = W + s·B·A computed in float32.

Only the adapted weights are decoded; every other byte of the base is copied unchanged. Works for
(residual, trained adapter), (original, converted LoRA) and any PEFT LoRA (rsLoRA, rank_pattern,
alpha_pattern, fan_in_fan_out).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoint
from .errors import UnsupportedError
from .output import OutputDir
from .peft_format import read_adapter
from .rewrite import Hashes, rewrite_checkpoint
from .tensorio import DTYPE_FLAGS, TensorInfo, torch_dtype

MERGE_MANIFEST = "ailora-merge.json"


def merge(
    base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
    revision: str | None = None, allow_pickle: bool = False, overwrite: bool = False, resume: bool = False,
    progress: bool = True,
) -> dict:
    """Write OUT as a complete HF model directory with the adapter merged into the base.

    Args:
        base: model directory or Hub id the adapter applies to.
        adapter: PEFT LoRA adapter directory.
        out: output model directory.
        dtype: float32, float16 or bfloat16 for the merged weights (default: as stored).
        revision, allow_pickle, overwrite, resume, progress: as for `decompose`.

    Returns:
        Summary: modules merged, largest |ΔW|, output path, seconds.

    Raises:
        TargetError: the adapter names a module the base lacks, or its shapes do not fit.

    Example:
        >>> merge("out/residual", "trained", "merged")  # doctest: +SKIP
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    lora = read_adapter(adapter)
    ckpt = Checkpoint.open(base, revision=revision, allow_pickle=allow_pickle, scratch=Path(out).absolute().parent)
    tensors = ckpt.tensors
    plan: dict[str, list[str]] = {}
    lora.check_fits(tensors, adapter=adapter, base=base)
    for m in lora.factors:
        info = tensors[m + ".weight"]
        plan.setdefault(info.file, []).append(info.name)
    for names in plan.values():
        names.sort(key=lambda n: tensors[n].begin)
    settings = {"tool": __version__, "command": "merge", "base": ckpt.describe(), "adapter": str(adapter),
                "adapter_config": lora.config, "dtype": dtype}
    largest: dict[str, float] = {}

    def compute(info: TensorInfo, W: torch.Tensor) -> torch.Tensor:
        m = info.name[: -len(".weight")]
        delta = lora.delta(m)
        largest[m] = float(delta.abs().max())
        return (W.float() + delta).to(torch_dtype(DTYPE_FLAGS[dtype]) if dtype else W.dtype)

    hashes = Hashes()
    with OutputDir(out, inputs=[ckpt.root, adapter], overwrite=overwrite, resume=resume, settings=settings) as od:
        def on_shard(shard: str) -> dict:
            return {"max_abs_delta": {n[: -len(".weight")]: largest[n[: -len(".weight")]] for n in plan.get(shard, [])}}

        def on_reuse(shard: str, record: dict) -> bool:
            largest.update(record["max_abs_delta"])
            return True

        rewrite_checkpoint(ckpt, od, "", plan, compute, hashes=hashes, out_dtype=DTYPE_FLAGS.get(dtype),
                           on_shard=on_shard, on_reuse=on_reuse, progress=progress, desc="merge")
        summary = {"output": str(od.path), "base": str(base), "adapter": str(adapter),
                   "modules": len(lora.factors), "max_abs_delta": max(largest.values(), default=0.0)}
        od.write_manifest(MERGE_MANIFEST, {**settings, "files": hashes.result(), "summary": summary})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
