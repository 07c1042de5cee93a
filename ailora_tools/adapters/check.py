"""Will this adapter load where it is going? Rules of vLLM, llama.cpp and PEFT (`rules`), each with a fix: the exact
command that fixes it (`convert --for`, which applies the servers' rules, `convert --dora` for DoRA, or `merge` for
what no LoRA can carry: those refusals are `rules.refusals`, shared with `convert --for`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputNotFoundError, OptionError
from ..init.peft_inits import applies_to_original
from ..io.peft_adapter import CONFIG_NAME, WEIGHTS_NAME, model_class, read_adapter
from ..manifests import RESIDUAL, BaseOf, base_of, base_problem_dir
from ..options import CHECK_TARGETS as TARGETS
from ..options import VLLM_MAX_LORA_RANKS
from ..training.bitfit import is_bitfit
from .rules import Finding, refusals, vllm_max_lora_rank


def check_adapter(
    lora: str | os.PathLike, *, target: str = "vllm", max_lora_rank: int = 16, base: str | os.PathLike | None = None
) -> list[Finding]:
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
    if target != "peft" and is_bitfit(d):  # a `train --bitfit` output: trained biases, no adapter
        return refusals(d, {}, None, server=target)
    found: list[Finding] = []
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file() or not (d / WEIGHTS_NAME).is_file():
        missing = CONFIG_NAME if not cfg_path.is_file() else WEIGHTS_NAME
        return [Finding("files", f"{d} has no {missing}", "pass a PEFT adapter directory saved with safetensors")]
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        found.append(Finding("peft_type", f"peft_type is {cfg.get('peft_type')!r}", "only LoRA adapters are supported"))
        return found
    meant = base_of(d)  # a residual adapter is sent to convert below; any other is checked against --base
    if (
        base is not None
        and (target == "peft" or not (meant.offset or meant.kind == RESIDUAL))
        and (problem := base_problem_dir(d, base)) is not None
    ):  # the fingerprints (`manifests`)
        found.append(Finding("base", problem, "the adapter was made for another model (see above)"))
    if target == "peft":
        found += [f for f in refusals(d, cfg, None, server="vllm") if f.rule == "bias"]
        return found + _peft_load(d, cfg, base)
    export = f"ailora-tools convert --trained {d} --for {target}" + (
        f" --base {meant.original or 'BASE'}" if target == "llama.cpp" else ""
    )
    found += _base_rule(d, cfg, meant, export)
    adapter = read_adapter(d, strict=False)
    found += refusals(d, cfg, adapter, server=target, base=base)
    return found + (_vllm_rules(d, cfg, adapter, export, max_lora_rank) if target == "vllm" else [])


def _base_rule(d: Path, cfg: dict, meant: BaseOf, export: str) -> list[Finding]:
    """An adapter that is not a LoRA on the original model a server loads (residual, exact mode): convert it."""
    fix = (
        f"run `ailora-tools convert --trained {d} -o OUT --dora exact` and serve OUT/base with OUT/adapter (DoRA: "
        "see the [dora] finding)"
        if cfg.get("use_dora")
        else f"run `{export} -o LORA` and serve LORA"
    )
    if meant.offset:
        return [Finding("base", "trained in exact mode: the initial product is not in the adapter", fix)]
    if meant.kind == RESIDUAL:
        return [
            Finding(
                "base", "the adapter applies to decompose's residual, not to the original model a server loads", fix
            )
        ]
    return []


def _vllm_rules(d: Path, cfg: dict, adapter, export: str, max_lora_rank: int) -> list[Finding]:
    """vLLM's rules an export fixes: string init_lora_weights, a rank above the server's limit, rank/alpha patterns."""
    found = []
    ranks = {A.shape[0] for A, _ in adapter.factors.values()}
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and applies_to_original(init):  # PEFT's init left the base as it is (mica, eva, ...)
        found.append(
            Finding(
                "init_lora_weights",
                f"init_lora_weights is {init!r}",
                f"run `ailora-tools convert --trained {d} --for vllm -o LORA` (it writes true)",
            )
        )
    elif isinstance(init, str):
        found.append(
            Finding(
                "init_lora_weights",
                f"init_lora_weights is {init!r}",
                f"run `ailora-tools convert --trained {d} --initial INITIAL --for vllm -o LORA` "
                "(INITIAL: the adapter training started from), or set it to true if the weights "
                "already are a standard LoRA",
            )
        )
    if ranks and max(ranks) > max_lora_rank:
        start = (
            f"start vLLM with --max-lora-rank {vllm_max_lora_rank(max(ranks))}, or "
            if max(ranks) <= VLLM_MAX_LORA_RANKS[-1]
            else ""
        )
        found.append(
            Finding(
                "rank",
                f"rank {max(ranks)} exceeds --max-lora-rank {max_lora_rank}",
                f"{start}run `{export} --max-lora-rank {max_lora_rank} -o LORA` (re-compresses and reports the error)",
            )
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        found.append(
            Finding(
                "patterns",
                "rank_pattern / alpha_pattern are set (older vLLM ignores them and scales wrongly)",
                f"run `{export} -o LORA`: it bakes every module's scale into B (one r, lora_alpha = r)",
            )
        )
    return found


def _peft_load(d: Path, cfg: dict, base) -> list[Finding]:
    """Load the adapter with PEFT onto the base model's architecture, built on the meta device (no weights read)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoConfig

    where = Path(base or cfg.get("base_model_name_or_path") or "")
    if not (where / "config.json").is_file():
        return [
            Finding("base", f"no base model config at {where}", "pass --base DIR (the model the adapter applies to)")
        ]
    try:
        config = AutoConfig.from_pretrained(where)
        with torch.device("meta"):
            cls = model_class(cfg.get("task_type"), config)
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, str(d), low_cpu_mem_usage=True)
    except Exception as e:  # noqa: BLE001  (whatever PEFT raises is the finding)
        return [
            Finding(
                "load",
                f"PEFT cannot load it: {' '.join(str(e).split())[:300]}",
                "fix the config or weights, or re-save the adapter with PEFT's save_pretrained",
            )
        ]
    found = [
        Finding("load", str(w.message)[:300], "the adapter does not fit this base: pass the base it was made for")
        for w in caught
        if "missing adapter keys" in str(w.message)
    ]
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        unused = sorted(set(f.keys()) - set(get_peft_model_state_dict(loaded)))
    if unused:
        found.append(
            Finding(
                "load",
                f"PEFT ignores {len(unused)} tensor(s) of the adapter, e.g. {unused[0]}",
                "the adapter's target_modules or key names do not match this base",
            )
        )
    return found
