"""Merge a LoRA adapter into full weights, streaming: W' = W + s·B·A computed in float32.

Only the adapted weights are decoded; every other byte of the base is copied unchanged. Works for
(residual, trained adapter), (original, converted LoRA) and any PEFT LoRA (rsLoRA, rank_pattern,
alpha_pattern, fan_in_fan_out).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoint
from .errors import UnsupportedError
from .output import OutputDir
from .peft_format import read_adapter
from .provenance import check_base
from .rewrite import Hashes, Replaced, rewrite_checkpoint
from .tensorio import DTYPE_FLAGS, FLOAT_DTYPES, TensorInfo, torch_dtype

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
    lora.check_fits(tensors, adapter=adapter, base=base)
    check_base(adapter, ckpt, flag="BASE")
    adapted = {m + ".weight" for m in lora.factors}
    out_dtype = DTYPE_FLAGS.get(dtype)
    plan: dict[str, list[str]] = {}  # with --dtype, every float tensor is cast, adapted or not
    for name, info in tensors.items():
        if name in adapted or (out_dtype is not None and info.dtype in FLOAT_DTYPES and info.dtype != out_dtype):
            plan.setdefault(info.file, []).append(name)
    for names in plan.values():
        names.sort(key=lambda n: tensors[n].begin)
    settings = {"tool": __version__, "command": "merge", "base": ckpt.describe(), "adapter": str(adapter),
                "adapter_config": lora.config, "dtype": dtype}

    def compute(info: TensorInfo, W: torch.Tensor) -> Replaced:
        target = torch_dtype(out_dtype) if out_dtype else W.dtype
        if info.name not in adapted:
            return Replaced(W.to(target))
        delta = lora.delta(info.name[: -len(".weight")])
        return Replaced((W.float() + delta).to(target), record={"max_abs_delta": float(delta.abs().max())})

    hashes = Hashes()
    with OutputDir(out, inputs=[ckpt.root, adapter], overwrite=overwrite, resume=resume, settings=settings) as od:
        done = rewrite_checkpoint(ckpt, od, "", plan, compute, hashes=hashes, out_dtype=out_dtype,
                                  progress=progress, desc="merge")
        if dtype is not None:
            _set_config_dtype(od, hashes, dtype)
        largest = [r["max_abs_delta"] for _, r in done.values() if "max_abs_delta" in r]
        summary = {"output": str(od.path), "base": str(base), "adapter": str(adapter),
                   "modules": len(lora.factors), "max_abs_delta": max(largest, default=0.0)}
        od.write_manifest(MERGE_MANIFEST, {**settings, "files": hashes.result(), "summary": summary})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _set_config_dtype(od: OutputDir, hashes: Hashes, dtype: str) -> None:
    """config.json says the dtype the weights now have (`torch_dtype`, and `dtype` where transformers wrote it)."""
    path = od.path / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = dtype
    with od.open_atomic("config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    hashes.add("output", "config.json", path)
