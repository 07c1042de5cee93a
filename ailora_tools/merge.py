"""Merge a LoRA adapter into full weights, streaming: W' = W + s·B·A computed in float32.

Only the adapted weights are decoded; every other byte of the base is copied unchanged. Works for
(residual, trained adapter), (original, converted LoRA) and any PEFT LoRA (rsLoRA, rank_pattern,
alpha_pattern, fan_in_fan_out).
"""
from __future__ import annotations

import os
import time

import torch

from . import __version__
from .checkpoint import Checkpoint
from .errors import TargetError, UnsupportedError
from .output import OutputDir
from .peft_format import read_adapter
from .rewrite import Hashes, rewrite_checkpoint
from .tensorio import FLOAT_DTYPES, TensorInfo

MERGE_MANIFEST = "ailora-merge.json"
DTYPE_FLAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def merge(
    base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
    revision: str | None = None, overwrite: bool = False, resume: bool = False, progress: bool = True,
) -> dict:
    """Write OUT as a complete HF model directory with the adapter merged into the base.

    Args:
        base: model directory or Hub id the adapter applies to.
        adapter: PEFT LoRA adapter directory.
        out: output model directory.
        dtype: float32, float16 or bfloat16 for the merged weights (default: as stored).
        revision, overwrite, resume, progress: as for `decompose`.

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
    ckpt = Checkpoint.open(base, revision=revision)
    tensors = ckpt.tensors
    plan: dict[str, list[str]] = {}
    for m, (A, B) in lora.factors.items():
        info = tensors.get(m + ".weight")
        if info is None:
            near = sorted(n for n in tensors if n.endswith(m.rsplit(".", 1)[-1] + ".weight"))[:3]
            raise TargetError(f"{adapter}: adapts module {m!r} but the base {base} has no tensor {m}.weight"
                              + (f" (it has e.g. {', '.join(near)})" if near else "")
                              + "; pass the base this adapter was trained on")
        shape = (B.shape[0], A.shape[1])
        if tuple(info.shape) != (shape[::-1] if lora.config.get("fan_in_fan_out") else shape):
            raise TargetError(f"{adapter}: {m} is {shape[0]}x{shape[1]} in the adapter but {info.name} in "
                              f"{info.file} is {info.shape[0]}x{info.shape[1]}; pass the matching base")
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; merge supports "
                                   f"{', '.join(FLOAT_DTYPES)}")
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
        return (W.float() + delta).to(FLOAT_DTYPES[DTYPE_FLAGS[dtype]] if dtype else W.dtype)

    hashes = Hashes()
    with OutputDir(out, inputs=[ckpt.root, adapter], overwrite=overwrite, resume=resume, settings=settings) as od:
        rewrite_checkpoint(ckpt, od, "", plan, compute, hashes=hashes, out_dtype=DTYPE_FLAGS.get(dtype),
                           progress=progress, desc="merge")
        summary = {"output": str(od.path), "base": str(base), "adapter": str(adapter),
                   "modules": len(lora.factors), "max_abs_delta": max(largest.values(), default=0.0)}
        od.write_manifest(MERGE_MANIFEST, {**settings, "files": hashes.result(), "summary": summary})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
