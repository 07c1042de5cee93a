"""bitsandbytes NF4, one matrix at a time, in the layout transformers loads directly (no model in memory).

A quantised linear weight `M.weight` [out, in] is stored as transformers saves a bitsandbytes 4-bit model:
`M.weight` (uint8 [ceil(out·in/2), 1], two 4-bit codes per byte), `M.weight.absmax`, `M.weight.quant_map` and,
with double quantisation (the default), `M.weight.nested_absmax` and `M.weight.nested_quant_map`, plus
`M.weight.quant_state.bitsandbytes__nf4` (the packed quant state: JSON bytes). config.json carries a
`quantization_config` (`quantization_config`) that lists the linear modules left in float (`skip_modules`).
Every shape is known from W's shape before W is quantised (`parts_layout`: the JSON is padded with spaces to
its longest length), so the rewrite engine writes a shard's header first and each matrix's parts as they come.

`read_dequantized(ckpt, name)` reads any weight of such a checkpoint back as a float tensor (the dequantised
values transformers computes with), for exporters and checks. bitsandbytes loads on the first call that
quantises or dequantises, never on import.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from ..errors import UnsupportedError

if TYPE_CHECKING:
    import torch

QUANT_TYPE, BLOCKSIZE, NESTED_BLOCKSIZE = "nf4", 64, 256
STATE = "quant_state.bitsandbytes__nf4"
#: what a quantised `M.weight` is stored as: M.weight itself ("") and M.weight.SUFFIX
SUFFIXES = ("", "absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE)
#: the float whose JSON is the longest: the packed state is padded to the length it would have with it
_LONGEST_FLOAT = -2.2250738585072014e-308
#: model heads transformers keeps in float (its `get_keys_to_not_convert`); a new classification head too
HEADS = ("lm_head", "score", "classifier")


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        raise UnsupportedError("--quantize nf4 needs bitsandbytes: pip install 'ailora-tools[quant]' (or "
                               "pip install bitsandbytes)") from e
    return F


def parts_layout(shape: tuple[int, int], dtype: str, *, double_quant: bool = True) -> dict[str, tuple[str, tuple]]:
    """What one [out, in] matrix becomes: suffix ("" the packed weight) -> (safetensors dtype, shape), in the order
    they are written. `dtype`: the safetensors dtype it dequantises to ("BF16", "F32", ...)."""
    n = math.prod(shape)
    blocks = -(-n // BLOCKSIZE)
    parts = {"": ("U8", (-(-n // 2), 1))}
    if double_quant:
        parts.update(absmax=("U8", (blocks,)), quant_map=("F32", (16,)),
                     nested_absmax=("F32", (-(-blocks // NESTED_BLOCKSIZE),)), nested_quant_map=("F32", (256,)))
    else:
        parts.update(absmax=("F32", (blocks,)), quant_map=("F32", (16,)))
    parts[STATE] = ("U8", (len(_state_json(shape, dtype, double_quant, _LONGEST_FLOAT)),))
    return parts


def _state_json(shape, dtype: str, double_quant: bool, offset: float) -> bytes:
    """bitsandbytes' packed quant state (`QuantState.as_dict(packed=True)`), with the keys in its order."""
    from ..io.tensorio import DTYPES

    state = {"quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "dtype": DTYPES[dtype][0], "shape": list(shape)}
    if double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    return json.dumps(state).encode()


def quantize(W: "torch.Tensor", *, dtype: str, double_quant: bool = True) -> dict[str, "torch.Tensor"]:
    """NF4 of W [out, in] (any float dtype, on CPU or a GPU bitsandbytes supports; quantised from float32) with
    bitsandbytes' `quantize_4bit`: suffix -> tensor on the CPU, shaped as `parts_layout` says.

    Args:
        dtype: the safetensors dtype the weight dequantises to (the checkpoint's: "BF16", "F32", ...).
        double_quant: quantise the block scales too (bitsandbytes' `compress_statistics`).

    Raises:
        UnsupportedError: bitsandbytes is not installed.

    Example:
        >>> parts = quantize(torch.randn(64, 32), dtype="F32")  # doctest: +SKIP
        >>> dequantize(parts).shape  # doctest: +SKIP
        torch.Size([64, 32])
    """
    import torch

    from ..io.tensorio import torch_dtype

    F = _bnb()
    packed, state = F.quantize_4bit(W.to(torch.float32).contiguous(), blocksize=BLOCKSIZE,
                                    compress_statistics=double_quant, quant_type=QUANT_TYPE)
    state.dtype = torch_dtype(dtype)
    parts = {"": packed, **state.as_dict(packed=True)}
    layout = parts_layout(tuple(W.shape), dtype, double_quant=double_quant)
    raw = bytes(parts[STATE].cpu().numpy())
    want = layout[STATE][1][0]
    if len(raw) > want:
        raise UnsupportedError(f"this bitsandbytes writes a quant state of {len(raw)} bytes, more than the {want} "
                               "ailora-tools plans for; install the bitsandbytes version pyproject.toml names")
    parts[STATE] = torch.frombuffer(bytearray(raw + b" " * (want - len(raw))), dtype=torch.uint8)
    parts = {k: parts[k].detach().to("cpu").contiguous() for k in layout}
    for k, (_, shape) in layout.items():
        if tuple(parts[k].shape) != shape:
            raise UnsupportedError(f"bitsandbytes returned {k or 'weight'} of shape {tuple(parts[k].shape)}, not "
                                   f"{shape}; install the bitsandbytes version pyproject.toml names")
    return parts


def dequantize(parts: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """The matrix NF4 `parts` (suffix -> tensor, as `quantize` gives or a checkpoint stores) hold, in the dtype its
    quant state names, on the device `parts` are on: what transformers' Linear4bit computes with."""
    F = _bnb()
    weight = parts[""]
    state = F.QuantState.from_dict({k: v for k, v in parts.items() if k}, device=weight.device)
    return F.dequantize_4bit(weight, state)


def quantized_weights(tensors) -> set[str]:
    """The names of the NF4-packed weights among a checkpoint's tensor names."""
    return {n[: -len(STATE) - 1] for n in tensors if n.endswith("." + STATE)}


def is_quantized(config: dict) -> bool:
    """Whether a model config says its weights are pre-quantised (any `quantization_config`)."""
    return bool(config.get("quantization_config"))


def read_dequantized(ckpt, name: str) -> "torch.Tensor":
    """Tensor `name` of a checkpoint (`io.checkpoint.Checkpoint`) as a float tensor: an NF4-packed weight
    dequantised (in the dtype it dequantises to, on the CPU), any other tensor as stored. Reads only that tensor's
    bytes (and its parts'), wherever the index puts them.

    Raises:
        UnsupportedError: a packed weight and no bitsandbytes.

    Example:
        >>> W = read_dequantized(Checkpoint.open("out/residual"), "model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """
    from ..io.tensorio import read_tensor

    def read(n):
        return read_tensor(ckpt.shard(ckpt.tensors[n].file), n)

    if f"{name}.{STATE}" not in ckpt.tensors:
        return read(name)
    return dequantize({k: read(f"{name}.{k}" if k else name) for k in SUFFIXES if (f"{name}.{k}" if k else name)
                       in ckpt.tensors})


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
    return {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
            "load_in_8bit": False, "llm_int8_threshold": 6.0, "llm_int8_skip_modules": list(skip),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": QUANT_TYPE, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}


def linear4bit(parts: dict[str, "torch.Tensor"], bias: "torch.Tensor | None" = None):
    """A bitsandbytes `Linear4bit` holding the NF4 `parts` (as `quantize` gives them) and `bias`, on their device:
    the layer transformers builds when it loads such a weight, for quantising a model in memory."""
    import torch

    F = _bnb()
    import bitsandbytes as bnb

    state = F.QuantState.from_dict({k: v for k, v in parts.items() if k}, device=parts[""].device)
    out_f, in_f = state.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=state.dtype, compress_statistics=state.nested,
                              quant_type=QUANT_TYPE, device="meta")
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=parts[""], quantized_stats={k: v for k, v in parts.items()
                                                                                        if k},
                                                       requires_grad=False, device=parts[""].device, module=layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
    return layer
