"""Export a PEFT LoRA as a llama.cpp LoRA adapter (GGUF), as llama.cpp's convert_lora_to_gguf.py does.

- metadata: general.architecture (the base's), general.type = adapter, adapter.type = lora,
  adapter.lora.alpha (float32);
- tensors `blk.N.attn_q.weight.lora_a` [r, in] and `.lora_b` [out, r] in numpy order, names from
  gguf's tensor name map;
- Llama-family q_proj / k_proj: lora_B's rows get the head permutation llama.cpp applies to the base;
- llama.cpp scales by alpha / rank (rank read from the tensor): rsLoRA and any per-module scale are
  folded into lora_B so that rule gives each module its PEFT scale.

Every architecture llama.cpp's convert_hf_to_gguf.py converts from the families in `LAYOUTS`: each row is the
converter class it is read from (llama.cpp as vendored by llama-cpp-python 0.3.36, `conversion/*.py`), its gguf
`MODEL_ARCH`, and the one transform of a weight's rows that class makes and a LoRA must follow (B's rows, since
ΔW = B·A): Llama's q/k head permutation, GPT-NeoX's per-head q/k/v interleave undone. The fused projections
(Phi-3 `qkv_proj`/`gate_up_proj`, GPT-2 `c_attn`, GPT-NeoX `query_key_value`) stay fused as llama.cpp holds them;
GPT-2's Conv1D weights are transposed by the converter to [out, in], the orientation PEFT's factors already have.
Gemma's norm offsets touch no LoRA target. The serving tests check this table against the converter's classes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputNotFoundError, OutputError, UnsupportedError
from ..experts import expert_modules
from ..io.peft_adapter import Adapter, read_adapter
from ..manifests import base_of, check_base_dir, require_original
from ..options import OUTTYPES


@dataclass(frozen=True)
class Layout:
    """How llama.cpp's converter lays out one architecture: its class, gguf MODEL_ARCH and the row transform."""

    converter: str  # the class of llama.cpp's convert_hf_to_gguf.py (conversion/*.py) the rules are read from
    arch: str  # its gguf.MODEL_ARCH member
    permute_qk: bool = False  # LlamaModel.undo_permute: q_proj/k_proj rows in llama.cpp's rope order
    neox_qkv: bool = False  # GPTNeoXModel: query_key_value rows [head, q|k|v, d] -> [q|k|v, head, d]


#: HF model_type -> llama.cpp's converter rules for it (the Hugging Face class its config.json names)
LAYOUTS = {
    "llama": Layout("LlamaModel", "LLAMA", permute_qk=True),
    "mistral": Layout("LlamaModel", "LLAMA", permute_qk=True),
    "mixtral": Layout("LlamaModel", "LLAMA", permute_qk=True),
    "smollm3": Layout("SmolLM3Model", "SMOLLM3", permute_qk=True),
    "qwen2": Layout("Qwen2Model", "QWEN2"),
    "qwen3": Layout("Qwen3Model", "QWEN3"),
    "qwen3_moe": Layout("Qwen3MoeModel", "QWEN3MOE"),
    "gemma2": Layout("Gemma2Model", "GEMMA2"),
    "gemma3_text": Layout("Gemma3Model", "GEMMA3"),
    "phi3": Layout("Phi3MiniModel", "PHI3"),
    "gpt_neox": Layout("GPTNeoXModel", "GPTNEOX", neox_qkv=True),
    "olmo2": Layout("Olmo2Model", "OLMO2"),
    "gpt_oss": Layout("GptOssModel", "GPT_OSS"),
    "gpt2": Layout("GPT2Model", "GPT2"),
}
#: the gguf tensors no LoRA of ours goes to: mixture-of-experts experts and routers
EXPERT_TENSORS = ("FFN_GATE_INP", "_EXP")


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's Llama q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute) of a matrix's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def neox_qkv_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows [head, q|k|v, d] in llama.cpp's converter's order [q|k|v, head, d]."""
    return w.reshape(n_head, 3, w.shape[0] // n_head // 3, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def layout_of(config: dict, what: str = "export-gguf") -> Layout:
    """llama.cpp's converter rules for the base model of `config` (its config.json).

    Raises:
        UnsupportedError: an architecture llama.cpp's converter does not convert from this table's families.
    """
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise UnsupportedError(
            f"{what}: architecture {model_type!r} is not supported; supported (as llama.cpp's "
            f"converter lays them out): {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def _rows(layout: Layout, module: str, B: torch.Tensor, config: dict) -> torch.Tensor:
    """B with its rows in the order llama.cpp's converter gives the base weight's rows."""
    n_head = config.get("num_attention_heads") or config.get("n_head")
    leaf = module.rsplit(".", 1)[-1]
    if layout.permute_qk and leaf == "q_proj":
        return permute_rows(B, n_head, n_head)
    if layout.permute_qk and leaf == "k_proj":
        return permute_rows(B, n_head, config.get("num_key_value_heads") or n_head)
    if layout.neox_qkv and leaf == "query_key_value":
        return neox_qkv_rows(B, n_head)
    return B


def gguf_tensors(adapter: Adapter, config: dict) -> tuple[str, float, dict[str, np.ndarray]]:
    """(gguf architecture, alpha to write, {gguf tensor name: float32 array}) for an adapter on a base config.

    Raises:
        UnsupportedError: an architecture, layout or module llama.cpp cannot take from this exporter.
    """
    import gguf

    layout = layout_of(config)
    if adapter.config.get("fan_in_fan_out") and layout.converter != "GPT2Model":
        raise UnsupportedError("export-gguf: fan_in_fan_out (Conv1D) adapters are supported on GPT-2 only")
    arch = gguf.MODEL_ARCH[layout.arch]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, config.get("num_hidden_layers") or config["n_layer"])
    first = next(iter(sorted(adapter.factors)))
    rank0 = adapter.factors[first][0].shape[0]
    alpha = adapter.scale(first) * rank0  # llama.cpp: scale = alpha / rank
    out: dict[str, np.ndarray] = {}
    for module, (A, B) in sorted(adapter.factors.items()):
        found = names.get_type_and_name(module)
        if ".experts" in module or (found and any(k in found[0].name for k in EXPERT_TENSORS)):
            raise UnsupportedError(
                f"export-gguf: module {module!r} is a mixture-of-experts expert or router; "
                "llama.cpp adapters are exported for attention and dense modules only"
            )
        if found is None:
            raise UnsupportedError(f"export-gguf: module {module!r} has no llama.cpp tensor in a {arch_name} model")
        fold = adapter.scale(module) / (alpha / A.shape[0])
        B = _rows(layout, module, B.float() * fold, config)
        out[f"{found[1]}.weight.lora_a"] = A.float().contiguous().numpy()
        out[f"{found[1]}.weight.lora_b"] = B.contiguous().numpy()
    return arch_name, alpha, out


def write_lora_gguf(
    path: Path,
    arch: str,
    alpha: float,
    tensors: dict[str, np.ndarray],
    outtype: str,
) -> tuple[dict[str, str], list[str]]:
    """Write a LoRA GGUF at `path` (`gguf_tensors`' output); return each tensor's type and those q8_0 could not take."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    types, unquantized = {}, []
    for name, data in tensors.items():
        qtype = {
            "f32": gguf.GGMLQuantizationType.F32,
            "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0,
        }[outtype]
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
            unquantized.append(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types, unquantized


def export_gguf(
    lora: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "f32",
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Write a llama.cpp LoRA GGUF for `lora` on `base` (only the base's config.json is read).

    Args:
        lora: PEFT LoRA directory (e.g. from `convert`, relative to the ORIGINAL base).
        base: the original base model directory.
        out: the .gguf file to write (beside, then renamed).
        outtype: f32, f16, bf16 or q8_0 (q8_0 needs rows that are multiples of 32; other tensors stay f16).
        force: export although `base` holds weights that are not the model the adapter's manifests record.

    Returns:
        Summary: architecture, alpha, tensors, type of each, and the tensors q8_0 could not take.

    Example:
        >>> export_gguf("lora", "meta-llama/Llama-3.1-8B", "lora.gguf", outtype="q8_0")  # doctest: +SKIP
    """
    if outtype not in OUTTYPES:
        raise UnsupportedError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    require_original(lora, "llama.cpp")
    warning = check_base_dir(lora, base, flag="--base", force=force)
    cfg_path = Path(base) / "config.json"
    if not cfg_path.is_file():
        raise InputNotFoundError(f"--base {base}: no config.json; pass the original base model directory")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"-o {out}: exists; pass --overwrite to replace it")
    if Path(lora).resolve() in out.absolute().parents:
        raise OutputError(f"-o {out}: lies inside the input {lora}; choose a path outside it")
    adapter = read_adapter(lora)
    if experts := expert_modules(adapter.factors):  # llama.cpp's LoRA converter maps no expert tensor
        raise UnsupportedError(
            f"export-gguf: {lora} adapts {len(experts)} expert matrices (e.g. {experts[0]}), which "
            f"llama.cpp's LoRA format has no tensors for; run `ailora-tools merge "
            f"{base_of(lora).model or base} {lora} -o MERGED` and convert MERGED to GGUF"
        )
    arch, alpha, tensors = gguf_tensors(adapter, json.loads(cfg_path.read_text()))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        types, unquantized = write_lora_gguf(tmp, arch, alpha, tensors, outtype)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "output": str(out.absolute()),
        "architecture": arch,
        "alpha": alpha,
        "tensors": len(tensors),
        "outtype": outtype,
        "types": types,
        "not_quantized": unquantized,
        "warning": warning,
        "note": (
            f"q8_0 needs rows that are multiples of 32: {len(unquantized)} tensors (row length = rank "
            "for lora_b) were written as f16"
            if unquantized
            else ""
        ),
    }
