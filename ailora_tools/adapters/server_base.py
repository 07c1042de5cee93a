"""The base a server loads for an adapter trained on a quantised residual (`export-base`): serve what was trained.

The model that was trained is dequant_nf4(Q) + s·B·A (`nf4_residual`). A server runs its own weight format, so the
residual's NF4 weights are re-quantised into it, read one matrix at a time, and each one's error
‖dequant_server(W) − dequant_nf4(W)‖ / ‖dequant_nf4(W)‖ is measured and recorded:

- vLLM: compressed-tensors W4A16 `pack-quantized` (int4, symmetric, groups of 128 along the input, vLLM's own
  format), written with the `compressed-tensors` library's quantiser and packer: per weight `weight_packed` (int32),
  `weight_scale`, `weight_shape`, and config.json's `quantization_config` as its ModelCompressor writes it. vLLM fuses
  q/k/v and gate/up into one layer that must have one scheme, so a float partner of a quantised matrix (k_proj when
  only q/v were quantised) is quantised too, its error measured against its float weight. (The NF4 residual itself
  is a bitsandbytes checkpoint vLLM also loads: `--quantization bitsandbytes`.)
- llama.cpp: a full GGUF of the Llama architecture: the NF4 weights as Q4_0 or Q8_0 (`gguf.quants`), every other
  matrix as stored (F32/F16/BF16), norms F32; q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does; the
  hyper-parameters and the tokenizer (sentencepiece `tokenizer.model`, or `tokenizer.json`) as that converter writes
  them (`gguf.vocab`).

With the trained adapter, its LoRA for that server goes beside (`serving.serve_rules`: scale in B, allowed rank;
llama.cpp: a LoRA GGUF, `gguf_export`): the adapter is unchanged, only the base's weights are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputNotFoundError, OptionError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import read_adapter, write_adapter
from ..io.rewrite import Hashes, Replaced, by_shard, rewrite_checkpoint
from ..io.tensorio import dtype_name, torch_dtype
from ..manifests import EXPORT_BASE_MANIFEST, RESIDUAL, base_of, check_base
from ..options import SERVER_FORMATS, choice
from .gguf_base import write_gguf_base
from .gguf_export import gguf_tensors, write_lora_gguf
from .nf4_residual import (
    PARTS,
    compute_dtype,
    is_quantized_residual,
    packed_shape,
    quantized_weights,
    read_dequantized,
    rel_error,
)
from .serving import serve_command, serve_rules

GROUP_SIZE = 128  # vLLM's W4A16 preset
#: modules vLLM fuses into one layer (one quantisation scheme per fused layer)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def export_base(
    residual: str | os.PathLike,
    out: str | os.PathLike,
    *,
    server: str,
    fmt: str | None = None,
    adapter: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the trained model's base (the quantised residual re-quantised for `server`) and, with `adapter`, its LoRA.

    Args:
        residual: decompose's NF4 residual directory (`decompose --quantize nf4`).
        out: output directory: OUT/base (vLLM) or OUT/base.gguf (llama.cpp), OUT/adapter or OUT/adapter.gguf.
        server: "vllm" or "llama.cpp". fmt: "w4a16" (vLLM); "q4_0" (default) or "q8_0" (llama.cpp).
        adapter: the adapter trained on `residual` (checked against it), written as that server takes it.

    Returns:
        Summary: output files, per-module re-quantisation errors and their worst/mean, how to serve.

    Raises:
        UnsupportedError: a residual that is not NF4-quantised, an architecture or shape the format cannot hold.
    """
    choice("--for", server, SERVER_FORMATS)
    fmt = fmt or SERVER_FORMATS[server][0]
    if fmt not in SERVER_FORMATS[server]:
        raise OptionError(f"--format {fmt}: {server} takes {', '.join(SERVER_FORMATS[server])}")
    if not (Path(residual) / "config.json").is_file():
        raise InputNotFoundError(f"{residual}: no config.json; pass decompose's OUT/residual")
    if not is_quantized_residual(residual):
        raise UnsupportedError(
            f"{residual}: its weights are not NF4-quantised (no bitsandbytes quantization_config "
            "in config.json); a float residual needs no export: serve it as it is, or convert the "
            "adapter to the original (`ailora-tools convert`)"
        )
    ckpt = Checkpoint.open(residual)
    lora = None
    if adapter is not None:
        if base_of(adapter).kind != RESIDUAL:
            raise OptionError(
                f"--adapter {adapter}: applies to the original model, not to a residual; export-base "
                "serves an adapter trained on the quantised residual"
            )
        check_base(adapter, ckpt, flag="RESIDUAL")
        lora = read_adapter(adapter)
    write = _write_w4a16 if server == "vllm" else write_gguf_base
    with OutputDir(out, inputs=[ckpt.root] + ([Path(adapter)] if adapter else []), overwrite=overwrite) as od:
        hashes = Hashes()
        summary = write(ckpt, od, fmt, hashes, progress)
        errors = summary["errors"]
        summary.update(
            server=server,
            format=fmt,
            residual=str(Path(residual).absolute()),
            output=str(od.path),
            worst_rel_fro_error=max(errors.values(), default=0.0),
            mean_rel_fro_error=sum(errors.values()) / len(errors) if errors else 0.0,
        )
        if lora is not None:
            summary.update(_write_adapter(od, lora, adapter, server, summary))
        files = hashes.result()
        for p in sorted(od.path.rglob("*")):  # the GGUFs and the adapter (the base's shards are hashed as written)
            rel = p.relative_to(od.path).as_posix()
            if p.is_file() and not p.name.startswith(".") and rel not in files["output"]:
                files["output"][rel] = file_digest(p)
        summary.pop("config_dir", None)
        od.write_manifest(
            EXPORT_BASE_MANIFEST, {"tool": __version__, "command": "export-base", **summary, "files": files}
        )
    return summary


def _write_adapter(od: OutputDir, lora, adapter, server: str, summary: dict) -> dict:
    """The trained adapter as `server` takes it, applying to the exported base."""
    lora.config["base_model_name_or_path"] = str(od.path / "base") if server == "vllm" else None
    served, report = serve_rules(lora, server=server, source=adapter, base=summary.get("config_dir"))
    if server == "vllm":
        write_adapter(od.path / "adapter", served.config, served.factors, dtype=torch.float32)
        command = serve_command("vllm", od.path / "adapter", od.path / "base", report["rank"])
    else:
        arch, alpha, tensors = gguf_tensors(served, json.loads(Path(summary["config_dir"], "config.json").read_text()))
        write_lora_gguf(od.partial("adapter.gguf"), arch, alpha, tensors, "f32")
        od.publish("adapter.gguf")
        command = f"llama-server -m {od.path / 'base.gguf'} --lora {od.path / 'adapter.gguf'}"
    return {"adapter": str(adapter), "adapter_rank": report["rank"], "serve_command": command}


def _vllm_quantized(ckpt: Checkpoint, packed: set[str]) -> dict[str, str]:
    """Weight -> why it is W4A16 in the vLLM base: "nf4" (quantised in the residual) or "fused" (a float partner)."""
    why = {n: "nf4" for n in packed}
    for name in packed:
        parent, _, last = name.removesuffix(".weight").rpartition(".")
        for group in FUSED:
            if last in group:
                for partner in group:
                    other = f"{parent}.{partner}.weight"
                    if other in ckpt.tensors and other not in why:
                        why[other] = "fused"
    return why


def _w4a16(W: torch.Tensor, scheme, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' W4A16 of W [out, in] (per group of 128 inputs: scale = max|w| / 7.5 as its
    `calculate_qparams` gives it, int4 codes packed by its `PackedQuantizationCompressor`), and its dequantised
    value."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    W = W.to(dtype)
    groups = W.reshape(W.shape[0], -1, GROUP_SIZE)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": W, "weight_scale": scale, "weight_zero_point": zero}, scheme
    )
    back = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    return {k: compressed[k] for k in ("weight_packed", "weight_scale", "weight_shape")}, back


def _scheme():
    try:
        from compressed_tensors.quantization import preset_name_to_scheme
    except ImportError as e:
        raise UnsupportedError(
            "--for vllm needs compressed-tensors: pip install 'ailora-tools[serve]' (or pip install compressed-tensors)"
        ) from e
    return preset_name_to_scheme("W4A16", ["Linear"])


def _write_w4a16(ckpt: Checkpoint, od: OutputDir, fmt: str, hashes: Hashes, progress: bool) -> dict:
    """OUT/base: the residual with its NF4 weights (and their fused partners) as compressed-tensors W4A16."""
    scheme, dtype = _scheme(), torch_dtype(compute_dtype(ckpt))
    packed = quantized_weights(ckpt.tensors)
    why = _vllm_quantized(ckpt, packed)
    shapes = {n: packed_shape(ckpt, n) if n in packed else tuple(ckpt.tensors[n].shape) for n in why}
    bad = sorted(n for n, s in shapes.items() if s[1] % GROUP_SIZE)
    if bad:
        raise UnsupportedError(
            f"{ckpt.source}: W4A16 quantises groups of {GROUP_SIZE} inputs; {bad[0]} has "
            f"{shapes[bad[0]][1]} (and {len(bad) - 1} more); serve it with --for llama.cpp or as "
            "the NF4 checkpoint it is (vllm serve RESIDUAL --quantization bitsandbytes)"
        )
    sdt = dtype_name(dtype)
    parts = {
        n: {n: ("I32", (s[0], s[1] // 8)), n + "_scale": (sdt, (s[0], s[1] // GROUP_SIZE)), n + "_shape": ("I64", (2,))}
        for n, s in shapes.items()
    }
    renamed = {n: n + "_packed" for n in why}
    dropped = {f"{n}.{k}" for n in packed for k in PARTS}
    plan = by_shard(ckpt.tensors, why)
    errors: dict[str, float] = {}

    def compute(info, W):
        ref = read_dequantized(ckpt, info.name).to(dtype)
        stored, back = _w4a16(ref, scheme, dtype)
        errors[info.name.removesuffix(".weight")] = rel_error(back, ref)
        return Replaced(
            stored["weight_packed"],
            parts={info.name + "_scale": stored["weight_scale"], info.name + "_shape": stored["weight_shape"]},
            record={"rel_fro_error": errors[info.name.removesuffix(".weight")]},
        )

    linear = {
        n.removesuffix(".weight")
        for n, t in ckpt.tensors.items()
        if len(t.shape) == 2 and n.endswith(".weight") and "embed" not in n
    } | {n.removesuffix(".weight") for n in packed}
    ignore = sorted(linear - {n.removesuffix(".weight") for n in why})
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    files = {"config.json": json.dumps(_ct_config(config, ignore), indent=2, sort_keys=True).encode()}
    done = rewrite_checkpoint(
        ckpt,
        od,
        "base",
        plan,
        compute,
        hashes=hashes,
        parts=parts,
        renamed=renamed,
        dropped=dropped,
        files=files,
        progress=progress,
        desc="w4a16",
    )
    for n, (_, record) in done.items():
        errors.setdefault(n.removesuffix(".weight"), record["rel_fro_error"])
    return {
        "base": str(od.path / "base"),
        "errors": dict(sorted(errors.items())),
        "quantized_from_float": sorted(n.removesuffix(".weight") for n, w in why.items() if w == "fused"),
        "ignored": ignore,
    }


def _ct_config(config: dict, ignore: list[str]) -> dict:
    """config.json with the `quantization_config` compressed-tensors' ModelCompressor writes for W4A16."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(
        config_groups={"group_0": _scheme()}, format="pack-quantized", quantization_status="compressed", ignore=ignore
    )
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(config))
        ModelCompressor(quantization_config=qc).update_config(d)
        return json.loads(Path(d, "config.json").read_text())
