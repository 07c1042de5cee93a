"""Export a PEFT LoRA as a llama.cpp LoRA adapter (GGUF), as llama.cpp's convert_lora_to_gguf.py does.

- metadata: general.architecture (the base's), general.type = adapter, adapter.type = lora,
  adapter.lora.alpha (float32);
- tensors `blk.N.attn_q.weight.lora_a` [r, in] and `.lora_b` [out, r] in numpy order, names from
  gguf's tensor name map;
- Llama-family q_proj / k_proj: lora_B's rows get the head permutation llama.cpp applies to the base;
- llama.cpp scales by alpha / rank (rank read from the tensor): rsLoRA and any per-module scale are
  folded into lora_B so that rule gives each module its PEFT scale.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputNotFoundError, OutputError, UnsupportedError
from ..experts import expert_modules
from ..io.peft_adapter import Adapter, read_adapter
from ..manifests import base_of, check_base_dir, require_original
from ..options import OUTTYPES

#: HF model_type -> (gguf architecture name, whether q/k rows are permuted)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's Llama q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute) of a matrix's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(adapter: Adapter, config: dict) -> tuple[str, float, dict[str, np.ndarray]]:
    """(gguf architecture, alpha to write, {gguf tensor name: float32 array}) for an adapter on a base config.

    Raises:
        UnsupportedError: an architecture, layout or module llama.cpp cannot take from this exporter.
    """
    import gguf

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedError(f"export-gguf: architecture {model_type!r} is not supported; supported: "
                               f"{', '.join(sorted(ARCHITECTURES))}")
    if adapter.config.get("fan_in_fan_out"):
        raise UnsupportedError("export-gguf: fan_in_fan_out (Conv1D) adapters are not supported")
    arch_name, permute = ARCHITECTURES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    first = next(iter(sorted(adapter.factors)))
    rank0 = adapter.factors[first][0].shape[0]
    alpha = adapter.scale(first) * rank0  # llama.cpp: scale = alpha / rank
    out: dict[str, np.ndarray] = {}
    for module, (A, B) in sorted(adapter.factors.items()):
        name = names.get_name(module)
        if name is None:
            raise UnsupportedError(f"export-gguf: module {module!r} has no llama.cpp tensor in a {arch_name} model")
        fold = adapter.scale(module) / (alpha / A.shape[0])
        B = B.float() * fold
        if permute and module.endswith("q_proj"):
            B = permute_rows(B, n_head, n_head)
        elif permute and module.endswith("k_proj"):
            B = permute_rows(B, n_head, n_kv)
        out[f"{name}.weight.lora_a"] = A.float().contiguous().numpy()
        out[f"{name}.weight.lora_b"] = B.contiguous().numpy()
    return arch_name, alpha, out


def write_lora_gguf(path: Path, arch: str, alpha: float, tensors: dict[str, np.ndarray], outtype: str,
                    ) -> tuple[dict[str, str], list[str]]:
    """Write a LoRA GGUF at `path` (`gguf_tensors`' output); return each tensor's type and those q8_0 could not take."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    types, unquantized = {}, []
    for name, data in tensors.items():
        qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
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


def export_gguf(lora: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32",
                overwrite: bool = False, force: bool = False) -> dict:
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
        raise UnsupportedError(f"export-gguf: {lora} adapts {len(experts)} expert matrices (e.g. {experts[0]}), which "
                               f"llama.cpp's LoRA format has no tensors for; run `ailora-tools merge "
                               f"{base_of(lora).model or base} {lora} -o MERGED` and convert MERGED to GGUF")
    arch, alpha, tensors = gguf_tensors(adapter, json.loads(cfg_path.read_text()))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        types, unquantized = write_lora_gguf(tmp, arch, alpha, tensors, outtype)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(out.absolute()), "architecture": arch, "alpha": alpha, "tensors": len(tensors),
            "outtype": outtype, "types": types, "not_quantized": unquantized, "warning": warning,
            "note": (f"q8_0 needs rows that are multiples of 32: {len(unquantized)} tensors (row length = rank "
                     "for lora_b) were written as f16" if unquantized else "")}
