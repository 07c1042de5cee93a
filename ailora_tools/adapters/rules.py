"""What servers take, as data and rules: vLLM's ranks and modules, a broken rule (`Finding`) with the command that
fixes it, and the refusals no export can fix (shared by `check` and `convert --for`).

Read from the servers' sources (vLLM 0.32/0.33, llama.cpp's convert_lora_to_gguf.py): vLLM serves LoRA on the
modules its model class declares (`SERVABLE_MODULES`, per architecture, read from vLLM 0.32.0; an architecture not
listed gets the Llama-, Mistral- and Qwen2-style set, one whose class declares no `SupportsLoRA` none), up to
`--max-lora-rank` from a fixed list; neither server takes DoRA, trained biases or whole trained modules
(`modules_to_save`); llama.cpp needs an architecture and layout its converter maps. Every fix names real paths
where the manifests record them (the base to merge into), so it runs as printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import NumericsError, UnsupportedError
from ..experts import LAYOUTS, expert_modules
from ..io.peft_adapter import Adapter
from ..manifests import base_of
from ..options import VLLM_MAX_LORA_RANKS
from ..training.bitfit import is_bitfit
from .gguf_export import gguf_tensors

#: linear modules vLLM serves LoRA on for Llama-, Mistral- and Qwen2-style models
VLLM_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
ANY_LINEAR = "*"
#: the vLLM release the per-architecture rows below were read from (`.ci/vllm_lora_modules.py` re-reads them from an
#: installed vLLM; the serving tests compare)
VLLM_TABLE_VERSION = "0.32.0"
#: model_type -> (vLLM's model class, the modules it serves LoRA on: the linear layers' names with each packed layer
#: replaced by what its `packed_modules_mapping` lists, and `embedding_modules`; empty: no `SupportsLoRA`; ANY_LINEAR:
#: vLLM's Transformers modelling backend, which swaps every linear layer of the transformers model for its own)
VLLM_READ: dict[str, tuple[str, tuple[str, ...]]] = {
    "gemma2": ("Gemma2ForCausalLM", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")),
    "gemma3_text": ("Gemma3ForCausalLM", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")),
    "gpt2": ("GPT2LMHeadModel", ()),
    "gpt_neox": ("TransformersForCausalLM", ("*", "embed_tokens")),
    "gpt_oss": ("GptOssForCausalLM", ("k_proj", "o_proj", "q_proj", "router", "v_proj")),
    "llama": (
        "LlamaForCausalLM",
        (
            "down_proj",
            "embed_tokens",
            "gate_proj",
            "k_proj",
            "lm_head",
            "o_proj",
            "q_proj",
            "score",
            "up_proj",
            "v_proj",
        ),
    ),
    "mistral": ("MistralForCausalLM", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")),
    "mixtral": ("MixtralForCausalLM", ("embed_tokens", "gate", "k_proj", "lm_head", "o_proj", "q_proj", "v_proj")),
    "olmo2": ("TransformersForCausalLM", ("*", "embed_tokens")),
    "phi3": ("Phi3ForCausalLM", ("down_proj", "embed_tokens", "gate_up_proj", "lm_head", "o_proj", "qkv_proj")),
    "qwen2": ("Qwen2ForCausalLM", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")),
    "qwen3": (
        "Qwen3ForCausalLM",
        ("down_proj", "embed_tokens", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        (
            "down_proj",
            "embed_tokens",
            "gate",
            "gate_up_proj",
            "k_proj",
            "lm_head",
            "o_proj",
            "q_proj",
            "shared_expert_gate",
            "v_proj",
        ),
    ),
    "smollm3": ("TransformersForCausalLM", ("*", "embed_tokens")),
}
#: model_type -> vLLM's model class (named in refusals)
VLLM_CLASSES = {t: cls for t, (cls, _) in VLLM_READ.items()}
#: server -> model_type (None: any other) -> the modules it serves LoRA on (empty: none); a new architecture is one
#: row, mixture-of-experts expert modules included
SERVABLE_MODULES: dict[str, dict[str | None, frozenset[str]]] = {
    "vllm": {None: VLLM_MODULES, **{t: frozenset(m) for t, (_, m) in VLLM_READ.items()}}
}


@dataclass(frozen=True)
class Finding:
    """One broken rule: which, what is wrong, and what to do."""

    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}; {self.fix}"


def servable_modules(server: str, model_type: str | None = None) -> frozenset[str]:
    """The module names `server` serves LoRA on for a model of `model_type` (the default row when not listed)."""
    rows = SERVABLE_MODULES[server]
    return rows.get(model_type, rows[None])


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` a vLLM server accepts that fits `rank`.

    Raises:
        NumericsError: a rank above vLLM's largest choice (512).
    """
    for choice in VLLM_MAX_LORA_RANKS:
        if choice >= rank:
            return choice
    raise NumericsError(f"rank {rank} exceeds vLLM's largest --max-lora-rank (512); convert with --max-rank 512")


def merge_fix(adapter: object) -> str:
    """The command that serves what no LoRA can carry: merge it into the base its manifests record (BASE if none)."""
    return f"run `ailora-tools merge {base_of(adapter).model or 'BASE'} {adapter} -o MERGED` and serve MERGED"


def dora_fix(adapter: object, rank: int) -> str:
    """The commands that serve a DoRA adapter: merge it, or convert it to a standard LoRA (exact or approximate)."""
    return (
        f"{merge_fix(adapter)}; or convert it to a standard LoRA: `ailora-tools convert --trained {adapter} -o OUT "
        "--dora exact` (a new base OUT/base plus the LoRA OUT/adapter, exact), or `ailora-tools convert --trained "
        f"{adapter} -o LORA --dora approximate --max-rank {2 * rank}` (a LoRA on the original, its error measured)"
    )


def refusals(
    adapter_dir: str | os.PathLike,
    config: dict,
    adapter: Adapter | None,
    *,
    server: str,
    base: str | os.PathLike | None = None,
) -> list[Finding]:
    """The rules no export can fix for `server` ("vllm" or "llama.cpp"), each with the command that serves it.

    Args:
        adapter_dir: the adapter's directory (named in the fixes).
        config: its adapter_config.json. adapter: its tensors (None: only the config is judged).
        base: the base model directory (llama.cpp: its config.json names the architecture); default the config's
            `base_model_name_or_path` when that is a local directory.
    """
    d = adapter_dir
    if is_bitfit(d):
        return [
            Finding(
                "bitfit",
                "trained bias terms (train --bitfit) are not a LoRA: no server takes them as an adapter",
                merge_fix(d),
            )
        ]
    found = _weights_refused(d, config, adapter, server)
    factors = adapter.factors if adapter else {}
    experts = set(expert_modules(factors))  # vLLM serves per-expert pairs on the MoE classes it declares LoRA for
    modules = sorted({m.rsplit(".", 1)[-1] for m in factors if m not in experts})
    if server == "vllm":
        model_type = _model_type(base or config.get("base_model_name_or_path"))
        return found + _vllm_experts_refused(d, sorted(experts), model_type) + _vllm_refused(d, modules, model_type)
    return found + _llama_cpp_refused(d, config, adapter, base)


def _model_type(base) -> str | None:
    """The model_type of a local base model's config.json (None: no such file)."""
    path = Path(str(base)) / "config.json" if base else None
    return json.loads(path.read_text()).get("model_type") if path is not None and path.is_file() else None


def _vllm_experts_refused(d, experts: list[str], model_type: str | None) -> list[Finding]:
    """vLLM's rule on expert LoRA: on a model whose checkpoints store the experts fused (GPT-OSS: vLLM's
    `is_3d_moe_weight`) it reads only PEFT's fused 3-D form (`experts.base_layer.lora_A/B`, `experts.lora_A/B`), not
    the per-expert pairs `convert` writes."""
    layout = LAYOUTS.get(model_type or "")
    if not experts or layout is None or not layout.stored_fused:
        return []
    return [
        Finding(
            "experts",
            f"adapts {len(experts)} expert matrices (e.g. {experts[0]}) of a {model_type} model: vLLM "
            f"{VLLM_TABLE_VERSION} reads {model_type} expert LoRA only in PEFT's fused 3-D form, which convert "
            "does not write (its per-expert pairs are served on Qwen3-MoE, Qwen2-MoE and Mixtral)",
            merge_fix(d),
        )
    ]


def _vllm_refused(d, modules: list[str], model_type: str | None) -> list[Finding]:
    """vLLM's rule on modules: its model class for `model_type` declares LoRA support, and serves these modules."""
    served = servable_modules("vllm", model_type)
    if not served:
        cls = VLLM_CLASSES.get(model_type, model_type)
        return [
            Finding(
                "architecture",
                f"vLLM {VLLM_TABLE_VERSION}'s {cls} ({model_type}) does not declare "
                "SupportsLoRA: vLLM serves no LoRA on this architecture",
                merge_fix(d),
            )
        ]
    if unknown := [m for m in modules if m not in served and ANY_LINEAR not in served]:
        arch = f" on {VLLM_CLASSES[model_type]}" if model_type in VLLM_CLASSES else ""
        return [
            Finding(
                "modules",
                f"vLLM does not serve LoRA on {unknown}{arch}",
                f"use modules among {sorted(served)}, or {merge_fix(d)}",
            )
        ]
    return []


def _weights_refused(d, config: dict, adapter: Adapter | None, server: str) -> list[Finding]:
    """DoRA, trained biases and whole trained modules: weights no server takes as a LoRA."""
    found = []
    if config.get("use_dora"):
        found.append(Finding("dora", "use_dora is true (DoRA)", dora_fix(d, int(config.get("r") or 8))))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append(
            Finding(
                "bias",
                f"bias is {config.get('bias')!r} / lora_bias {config.get('lora_bias')}: trained "
                "biases are not LoRA weights",
                "merge the adapter with PEFT (merge_and_unload) and serve "
                'the merged model, or train with bias="none" and lora_bias=False',
            )
        )
    saved = sorted(config.get("modules_to_save") or []) or sorted(
        {n.rsplit(".", 1)[0] for n in (adapter.extra if adapter else {})}
    )
    if saved:
        found.append(
            Finding(
                "modules_to_save",
                f"modules_to_save has {saved} (a trained head or resized embedding): "
                f"{server} serves LoRA factors, and would drop or reject them",
                f"{merge_fix(d)}, or save those modules into the base and serve the adapter without them",
            )
        )
    return found


def _llama_cpp_refused(d, config: dict, adapter: Adapter | None, base) -> list[Finding]:
    """llama.cpp's rules: a base config.json naming an architecture its converter maps (`gguf_export.LAYOUTS`), and
    modules it holds (Conv1D only on GPT-2, no mixture-of-experts experts)."""
    if adapter is not None and (experts := expert_modules(adapter.factors)):
        return [
            Finding(
                "experts",
                f"adapts {len(experts)} expert matrices (e.g. {experts[0]}): llama.cpp's LoRA "
                "converter has no expert tensors",
                f"{merge_fix(d)} (convert_hf_to_gguf.py takes MERGED)",
            )
        ]
    where = base or config.get("base_model_name_or_path")
    if where is None or not (Path(where) / "config.json").is_file():
        return [
            Finding(
                "base",
                f"no base model config.json at {where}" if where else "no --base given",
                "pass --base DIR, the original base model directory (only its config.json is read)",
            )
        ]
    base_config = json.loads((Path(where) / "config.json").read_text())
    if adapter is not None:
        try:
            gguf_tensors(adapter, base_config)
        except UnsupportedError as e:
            return [
                Finding(
                    "architecture",
                    str(e).removeprefix("export-gguf: "),
                    f"llama.cpp cannot take this adapter; {merge_fix(d)}",
                )
            ]
    elif config.get("fan_in_fan_out") and base_config.get("model_type") != "gpt2":
        return [Finding("fan_in_fan_out", "fan_in_fan_out (Conv1D) layout on a model other than GPT-2", merge_fix(d))]
    return []
