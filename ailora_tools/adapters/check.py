"""Will this adapter load where it is going? Rules of vLLM, llama.cpp and PEFT, each with a fix."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputNotFoundError, NumericsError, OptionError
from ..io.peft_adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from ..manifests import RESIDUAL, base_of, base_problem_dir

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
        raise OptionError(f"--for {target!r}: choose one of {', '.join(TARGETS)}")
    d = Path(lora)
    if not d.is_dir():
        raise InputNotFoundError(f"{d}: no such adapter directory")
    found: list[Finding] = []
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file() or not (d / WEIGHTS_NAME).is_file():
        missing = CONFIG_NAME if not cfg_path.is_file() else WEIGHTS_NAME
        return [Finding("files", f"{d} has no {missing}", "pass a PEFT adapter directory saved with safetensors")]
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        found.append(Finding("peft_type", f"peft_type is {cfg.get('peft_type')!r}", "only LoRA adapters are supported"))
        return found
    if cfg.get("use_dora") and target != "peft":
        found.append(Finding("dora", "use_dora is true (DoRA)", "serve a model merged by PEFT (PeftModel.from_pretrained "
                             "then merge_and_unload() and save_pretrained; `ailora-tools merge` does not apply DoRA's "
                             "magnitudes), or train a plain LoRA"))
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        found.append(Finding("bias", f"bias is {cfg.get('bias')!r} / lora_bias {cfg.get('lora_bias')}",
                             'train with bias="none" and lora_bias=False, or merge the adapter'))
    if base is not None and (problem := base_problem_dir(d, base)) is not None:
        found.append(Finding("base", problem, "the adapter was made for another model (see above)"))
    if target == "peft":
        return found + _peft_load(d, cfg, base)
    if base_of(d).offset:
        found.append(Finding("base", "trained in exact mode: the initial product is not in the adapter",
                             f"run `ailora-tools convert --trained {d} -o LORA` and serve LORA"))
    elif base_of(d).kind == RESIDUAL:
        found.append(Finding("base", "the adapter applies to decompose's residual, not to the original model a server "
                             "loads", f"run `ailora-tools convert --trained {d} -o LORA` and serve LORA"))
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


def _peft_load(d: Path, cfg: dict, base) -> list[Finding]:
    """Load the adapter with PEFT onto the base model's architecture, built on the meta device (no weights read)."""
    import warnings

    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoConfig

    from ..io.peft_adapter import model_class

    where = Path(base or cfg.get("base_model_name_or_path") or "")
    if not (where / "config.json").is_file():
        return [Finding("base", f"no base model config at {where}", "pass --base DIR (the model the adapter applies to)")]
    try:
        config = AutoConfig.from_pretrained(where)
        with torch.device("meta"):
            cls = model_class(cfg.get("task_type"), config)
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, str(d), low_cpu_mem_usage=True)
    except Exception as e:  # noqa: BLE001  (whatever PEFT raises is the finding)
        return [Finding("load", f"PEFT cannot load it: {' '.join(str(e).split())[:300]}",
                        "fix the config or weights, or re-save the adapter with PEFT's save_pretrained")]
    found = [Finding("load", str(w.message)[:300], "the adapter does not fit this base: pass the base it was made for")
             for w in caught if "missing adapter keys" in str(w.message)]
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        unused = sorted(set(f.keys()) - set(get_peft_model_state_dict(loaded)))
    if unused:
        found.append(Finding("load", f"PEFT ignores {len(unused)} tensor(s) of the adapter, e.g. {unused[0]}",
                             "the adapter's target_modules or key names do not match this base"))
    return found


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` a vLLM server accepts that fits `rank`."""
    for choice in VLLM_MAX_LORA_RANKS:
        if choice >= rank:
            return choice
    raise NumericsError(f"rank {rank} exceeds vLLM's largest --max-lora-rank (512); convert with --max-rank 512")
