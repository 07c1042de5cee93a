"""bitsandbytes NF4 on disk: the tensors and config transformers stores for a 4-bit model (maths: `quantization.nf4`).

A quantised linear weight `M.weight` [out, in] is stored as transformers saves a bitsandbytes 4-bit model:
`M.weight` (uint8 [ceil(out·in/2), 1], two 4-bit codes per byte), `M.weight.absmax`, `M.weight.quant_map` and,
with double quantisation (the default), `M.weight.nested_absmax` and `M.weight.nested_quant_map`, plus
`M.weight.quant_state.bitsandbytes__nf4` (the packed quant state: JSON bytes). config.json carries a
`quantization_config` (`quantization_config`) that lists the linear modules left in float (`skip_modules`).
Every shape is known from W's shape before W is quantised (`parts_layout`: the JSON is padded with spaces to
its longest length), so the rewrite engine writes a shard's header first and each matrix's parts as they come.
"""

from __future__ import annotations

import json
import math

from .tensorio import DTYPES

QUANT_TYPE, BLOCKSIZE, NESTED_BLOCKSIZE = "nf4", 64, 256
STATE = "quant_state.bitsandbytes__nf4"
#: what a quantised `M.weight` is stored as: M.weight itself ("") and M.weight.SUFFIX
SUFFIXES = ("", "absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE)
#: the float whose JSON is the longest: the packed state is padded to the length it would have with it
_LONGEST_FLOAT = -2.2250738585072014e-308
#: model heads transformers keeps in float (its `get_keys_to_not_convert`); a new classification head too
HEADS = ("lm_head", "score", "classifier")


def parts_layout(shape: tuple[int, int], dtype: str, *, double_quant: bool = True) -> dict[str, tuple[str, tuple]]:
    """What one [out, in] matrix becomes: suffix ("" the packed weight) -> (safetensors dtype, shape), in the order
    they are written. `dtype`: the safetensors dtype it dequantises to ("BF16", "F32", ...)."""
    n = math.prod(shape)
    blocks = -(-n // BLOCKSIZE)
    parts = {"": ("U8", (-(-n // 2), 1))}
    if double_quant:
        parts.update(
            absmax=("U8", (blocks,)),
            quant_map=("F32", (16,)),
            nested_absmax=("F32", (-(-blocks // NESTED_BLOCKSIZE),)),
            nested_quant_map=("F32", (256,)),
        )
    else:
        parts.update(absmax=("F32", (blocks,)), quant_map=("F32", (16,)))
    parts[STATE] = ("U8", (len(_state_json(shape, dtype, double_quant, _LONGEST_FLOAT)),))
    return parts


def _state_json(shape, dtype: str, double_quant: bool, offset: float) -> bytes:
    """bitsandbytes' packed quant state (`QuantState.as_dict(packed=True)`), with the keys in its order."""
    state = {"quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "dtype": DTYPES[dtype][0], "shape": list(shape)}
    if double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    return json.dumps(state).encode()


def quantized_weights(tensors) -> set[str]:
    """The names of the NF4-packed weights among a checkpoint's tensor names."""
    return {n[: -len(STATE) - 1] for n in tensors if n.endswith("." + STATE)}


def is_quantized(config: dict) -> bool:
    """Whether a model config says its weights are pre-quantised (any `quantization_config`)."""
    return bool(config.get("quantization_config"))


def skip_modules(linear, quantized) -> list[str]:
    """transformers' `llm_int8_skip_modules` for a checkpoint whose `quantized` modules (of all its `linear` ones)
    are NF4: the others by their last name part where that names no quantised module (transformers matches a
    pattern as a suffix of the module name), else by full name; and the model heads (`HEADS`)."""
    quantized = set(quantized)
    out = set()
    for m in set(linear) - quantized:
        last = m.rsplit(".", 1)[-1]
        out.add(m if any(q.endswith(last) for q in quantized) else last)
    out |= {h for h in HEADS if not any(q.endswith(h) for q in quantized)}
    return sorted(out)


def quantization_config(*, compute_dtype: str, skip: list[str], double_quant: bool = True) -> dict:
    """config.json's `quantization_config` for an NF4 checkpoint (what transformers' BitsAndBytesConfig saves).
    `compute_dtype`: torch dtype name ("bfloat16", "float32")."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": QUANT_TYPE,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
    }
