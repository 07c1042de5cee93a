"""bitsandbytes NF4 maths, one matrix at a time: quantise, dequantise, a `Linear4bit` (no model in memory).

What transformers stores for such a weight (tensor names, shapes, the packed quant state, config.json's
`quantization_config`) is storage, in `io.nf4_layout`.
`read_dequantized(ckpt, name)` reads any weight of an NF4 checkpoint back as a float tensor (the dequantised
values transformers computes with), for exporters and checks. bitsandbytes loads on the first call that
quantises or dequantises, never on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedError
from ..io.nf4_layout import BLOCKSIZE, QUANT_TYPE, STATE, SUFFIXES, parts_layout
from ..io.tensorio import read_tensor, torch_dtype

if TYPE_CHECKING:
    import torch


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        raise UnsupportedError(
            "--quantize nf4 needs bitsandbytes: pip install 'ailora-tools[quant]' (or pip install bitsandbytes)"
        ) from e
    return F


def quantize(W: torch.Tensor, *, dtype: str, double_quant: bool = True) -> dict[str, torch.Tensor]:
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

    F = _bnb()
    packed, state = F.quantize_4bit(
        W.to(torch.float32).contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=QUANT_TYPE
    )
    state.dtype = torch_dtype(dtype)
    parts = {"": packed, **state.as_dict(packed=True)}
    layout = parts_layout(tuple(W.shape), dtype, double_quant=double_quant)
    raw = bytes(parts[STATE].cpu().numpy())
    want = layout[STATE][1][0]
    if len(raw) > want:
        raise UnsupportedError(
            f"this bitsandbytes writes a quant state of {len(raw)} bytes, more than the {want} "
            "ailora-tools plans for; install the bitsandbytes version pyproject.toml names"
        )
    parts[STATE] = torch.frombuffer(bytearray(raw + b" " * (want - len(raw))), dtype=torch.uint8)
    parts = {k: parts[k].detach().to("cpu").contiguous() for k in layout}
    for k, (_, shape) in layout.items():
        if tuple(parts[k].shape) != shape:
            raise UnsupportedError(
                f"bitsandbytes returned {k or 'weight'} of shape {tuple(parts[k].shape)}, not "
                f"{shape}; install the bitsandbytes version pyproject.toml names"
            )
    return parts


def dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The matrix NF4 `parts` (suffix -> tensor, as `quantize` gives or a checkpoint stores) hold, in the dtype its
    quant state names, on the device `parts` are on: what transformers' Linear4bit computes with."""
    F = _bnb()
    weight = parts[""]
    state = F.QuantState.from_dict({k: v for k, v in parts.items() if k}, device=weight.device)
    return F.dequantize_4bit(weight, state)


def read_dequantized(ckpt, name: str) -> torch.Tensor:
    """Tensor `name` of a checkpoint (`io.checkpoint.Checkpoint`) as a float tensor: an NF4-packed weight
    dequantised (in the dtype it dequantises to, on the CPU), any other tensor as stored. Reads only that tensor's
    bytes (and its parts'), wherever the index puts them.

    Raises:
        UnsupportedError: a packed weight and no bitsandbytes.

    Example:
        >>> W = read_dequantized(Checkpoint.open("out/residual"),
        ...                      "model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """

    def read(n):
        return read_tensor(ckpt.shard(ckpt.tensors[n].file), n)

    if f"{name}.{STATE}" not in ckpt.tensors:
        return read(name)
    return dequantize(
        {k: read(f"{name}.{k}" if k else name) for k in SUFFIXES if (f"{name}.{k}" if k else name) in ckpt.tensors}
    )


def linear4bit(parts: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
    """A bitsandbytes `Linear4bit` holding the NF4 `parts` (as `quantize` gives them) and `bias`, on their device:
    the layer transformers builds when it loads such a weight, for quantising a model in memory."""
    import torch

    F = _bnb()
    import bitsandbytes as bnb

    state = F.QuantState.from_dict({k: v for k, v in parts.items() if k}, device=parts[""].device)
    out_f, in_f = state.shape
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=state.dtype,
        compress_statistics=state.nested,
        quant_type=QUANT_TYPE,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=parts[""],
        quantized_stats={k: v for k, v in parts.items() if k},
        requires_grad=False,
        device=parts[""].device,
        module=layer,
    )
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
    return layer
