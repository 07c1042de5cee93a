"""An NF4-quantised residual (`decompose --quantize nf4`) read back: which weights are packed, their dequantised
values, and the three checkpoints a trained adapter on it involves.

A packed weight `M.weight` is stored as transformers saves a bitsandbytes 4-bit model: `M.weight` (uint8, two codes
a byte) beside `M.weight.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
`.quant_state.bitsandbytes__nf4` (JSON). The model that was trained is dequant(Q) + s·B·A: what every export of
such an adapter is measured against (`rel_error`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputNotFoundError
from ..io.checkpoint import Checkpoint
from ..io.nf4_layout import STATE, SUFFIXES, quantized_weights
from ..io.peft_adapter import read_adapter
from ..io.tensorio import DTYPE_FLAGS, read_tensor
from ..manifests import (
    CONVERT_MANIFEST,
    DECOMPOSE_MANIFEST,
    RESIDUAL_DIR,
    TRAIN_MANIFEST,
    read_manifest,
)
from ..quantization.nf4 import read_dequantized

if TYPE_CHECKING:
    import torch

#: the tensors beside a packed `M.weight`: M.weight.SUFFIX
PARTS = tuple(k for k in SUFFIXES if k)


def packed_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    """The [out, in] shape a packed weight dequantises to (its quant state's JSON)."""
    raw = read_tensor(ckpt.shard(ckpt.tensors[f"{name}.{STATE}"].file), f"{name}.{STATE}")
    return tuple(json.loads(bytes(raw.numpy()).decode())["shape"])


def rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """‖result − reference‖_F / ‖reference‖_F in float64 (0 for a zero reference equal to the result)."""
    import torch

    ref = reference.double()
    norm = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(result.double() - ref))
    return diff / norm if norm > 0 else diff


def is_quantized_residual(path: str | os.PathLike) -> bool:
    """Whether a model directory holds NF4-packed weights (its config.json has a bitsandbytes quantization_config)."""
    q = read_manifest(Path(path) / "config.json").get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit"))


@dataclass
class QuantizedRun:
    """A trained adapter's quantised residual and the original it was decomposed from, as checkpoints."""

    residual: Checkpoint
    original: str  # the original model (path or Hub id) decompose read
    packed: set[str]  # NF4-packed weight names in the residual

    def open_original(self) -> Checkpoint:
        try:
            return Checkpoint.open(self.original)
        except Exception as e:
            raise InputNotFoundError(
                f"the original model {self.original} the quantised residual was decomposed from "
                f"cannot be opened ({e}); it is needed for its float layout and weights"
            ) from e


def quantized_run(initial: str | os.PathLike) -> QuantizedRun | None:
    """The quantised residual beside an initial adapter (decompose's OUT/adapter), or None when it is float."""
    out = Path(initial).parent
    residual = out / RESIDUAL_DIR
    if not residual.is_dir() or not is_quantized_residual(residual):
        return None
    ckpt = Checkpoint.open(residual)
    original = (read_manifest(out / DECOMPOSE_MANIFEST).get("source") or {}).get("model")
    return QuantizedRun(ckpt, original, quantized_weights(ckpt.tensors))


def float_view(ckpt: Checkpoint, dtype: str) -> dict:
    """The checkpoint's tensors as the float model they dequantise to: packed weights with their [out, in] shape and
    `dtype` (a safetensors dtype name), their scales left out."""
    packed = quantized_weights(ckpt.tensors)
    parts = {f"{n}.{k}" for n in packed for k in PARTS}
    return {
        n: replace(t, shape=packed_shape(ckpt, n), dtype=dtype) if n in packed else t
        for n, t in ckpt.tensors.items()
        if n not in parts
    }


def compute_dtype(ckpt: Checkpoint) -> str:
    """The safetensors dtype an NF4 checkpoint's packed weights dequantise to (its bnb_4bit_compute_dtype)."""
    return DTYPE_FLAGS[(ckpt.config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype") or "float32"]


def trained_on(adapter: str | os.PathLike) -> tuple[QuantizedRun, object] | None:
    """For an adapter trained on a quantised residual, or converted from one: the run and the TRAINED adapter
    (whose dequant(Q) + s·B·A is the model every export is measured against); None otherwise."""
    d = Path(adapter)
    converted = read_manifest(d / CONVERT_MANIFEST)
    if converted.get("trained") and converted.get("initial"):
        trained, initial = Path(converted["trained"]), Path(converted["initial"])
    elif (d / TRAIN_MANIFEST).is_file():
        trained, initial = d, Path(read_manifest(d / TRAIN_MANIFEST).get("initial_adapter", ""))
    else:
        return None
    run = quantized_run(initial) if initial.name else None
    return (run, read_adapter(trained)) if run is not None and trained.is_dir() else None


def trained_reference(run: QuantizedRun, trained, name: str) -> torch.Tensor:
    """W_trained = dequant(Q) + s·B·A of weight `name` (float32): the model trained on the quantised residual."""
    module = name.removesuffix(".weight")
    W = read_dequantized(run.residual, name).float()
    return W + trained.delta(module) if module in trained.factors else W
