"""Will this adapter load where it is going? Rules of vLLM, llama.cpp and PEFT, each with a fix."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import NumericsError
from .peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter

#: linear modules vLLM serves LoRA on for Llama-, Mistral- and Qwen2-style models
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
VLLM_MODULES_TO_SAVE = {"classifier", "score"}
#: the --max-lora-rank values a vLLM server accepts
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TARGETS = ("vllm", "llama.cpp", "peft")


@dataclass(frozen=True)
class Finding:
    """One broken rule: which, what is wrong, and what to do."""

    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}; {self.fix}"


def check_adapter(lora: str | os.PathLike, *, target: str = "vllm", max_lora_rank: int = 16,
                  base: str | os.PathLike | None = None) -> list[Finding]:
    """Every rule `lora` breaks for `target` ("vllm", "llama.cpp" or "peft"); empty when it passes.

    Args:
        max_lora_rank: the vLLM server's --max-lora-rank.
        base: base model directory (its config.json): needed for llama.cpp's architecture check.

    Example:
        >>> check_adapter("lora", target="vllm", max_lora_rank=32)  # doctest: +SKIP
        []
    """
    if target not in TARGETS:
        raise ValueError(f"--for {target!r}: choose one of {', '.join(TARGETS)}")
    d = Path(lora)
    found: list[Finding] = []
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file() or not (d / WEIGHTS_NAME).is_file():
        missing = CONFIG_NAME if not cfg_path.is_file() else WEIGHTS_NAME
        return [Finding("files", f"{d} has no {missing}", "pass a PEFT adapter directory saved with safetensors")]
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        found.append(Finding("peft_type", f"peft_type is {cfg.get('peft_type')!r}", "only LoRA adapters are supported"))
        return found
    if cfg.get("use_dora"):
        found.append(Finding("dora", "use_dora is true (DoRA)", "merge the DoRA adapter, or train a plain LoRA"))
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        found.append(Finding("bias", f"bias is {cfg.get('bias')!r} / lora_bias {cfg.get('lora_bias')}",
                             'train with bias="none" and lora_bias=False, or merge the adapter'))
    if target == "peft":
        try:
            read_adapter(d)
        except Exception as e:  # noqa: BLE001  (any load failure is the finding)
            found.append(Finding("load", str(e), "re-save the adapter with PEFT's save_pretrained"))
        return found
    adapter = read_adapter(d, strict=False)
    modules = sorted({m.rsplit(".", 1)[-1] for m in adapter.factors})
    ranks = {A.shape[0] for A, _ in adapter.factors.values()}
    if target == "vllm":
        extra = set(cfg.get("modules_to_save") or []) - VLLM_MODULES_TO_SAVE
        if extra:
            found.append(Finding("modules_to_save", f"modules_to_save has {sorted(extra)}",
                                 "vLLM only takes classifier/score there: merge those modules into the base"))
        if isinstance(cfg.get("init_lora_weights"), str):
            found.append(Finding("init_lora_weights", f"init_lora_weights is {cfg['init_lora_weights']!r}",
                                 "run `ailora-tools convert` (it writes true), or set it to true if the weights "
                                 "already are a standard LoRA"))
        if max(ranks) > max_lora_rank:
            found.append(Finding("rank", f"rank {max(ranks)} exceeds --max-lora-rank {max_lora_rank}",
                                 f"start vLLM with --max-lora-rank {vllm_max_lora_rank(max(ranks))}, or convert with --max-rank "
                                 f"{max_lora_rank}"))
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            found.append(Finding("patterns", "rank_pattern / alpha_pattern are set (older vLLM ignores them and scales "
                                 "wrongly)", "re-export with one r and one alpha: `ailora-tools convert` folds the scales"))
        unknown = [m for m in modules if m not in VLLM_MODULES]
        if unknown:
            found.append(Finding("modules", f"vLLM does not serve LoRA on {unknown}",
                                 f"use modules among {sorted(VLLM_MODULES)}, or merge the adapter"))
    else:  # llama.cpp
        if cfg.get("fan_in_fan_out"):
            found.append(Finding("fan_in_fan_out", "fan_in_fan_out (Conv1D) layout", "merge the adapter instead"))
        if base is None:
            found.append(Finding("base", "no --base given", "pass the original base directory (its config.json)"))
        else:
            from .gguf_export import gguf_tensors
            try:
                gguf_tensors(adapter, json.loads((Path(base) / "config.json").read_text()))
            except Exception as e:  # noqa: BLE001
                found.append(Finding("architecture", re.sub(r"^export-gguf: ", "", str(e)),
                                     "llama.cpp cannot take this adapter from ailora-tools; merge it instead"))
    return found


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` a vLLM server accepts that fits `rank`."""
    for choice in VLLM_MAX_LORA_RANKS:
        if choice >= rank:
            return choice
    raise NumericsError(f"rank {rank} exceeds vLLM's largest --max-lora-rank (512); convert with --max-rank 512")
