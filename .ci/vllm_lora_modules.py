"""Re-read vLLM's servable LoRA modules per architecture from an installed vLLM (run it with vLLM's interpreter:
`~/.cache/ailora-ci/servers/vllm-0.32.0/bin/python .ci/vllm_lora_modules.py`); prints JSON
{"vllm": version, "models": {model_type: {"class", "supports_lora", "modules"}}}, which
`ailora_tools.adapters.rules.SERVABLE_MODULES` records (tests/test_serve_vllm.py compares them).

What vLLM serves a LoRA on, as its LoRA loader decides (`vllm/lora`): the names of the model's linear layers, each
packed layer replaced by the modules `packed_modules_mapping` says it packs (Llama's `qkv_proj` takes q/k/v_proj;
Phi-3's takes `qkv_proj` itself), plus the keys of `embedding_modules`; none where the class does not declare
`SupportsLoRA`; "*" (any linear layer) for an architecture vLLM runs through its Transformers modelling backend,
which swaps every linear layer of the transformers model for its own. The linear layers are read from the source of
the model's module and of the vLLM model modules it imports from (the `self.NAME = ...Linear(` assignments),
without building a model.
"""

import importlib
import inspect
import json
import re
import sys

#: model_type -> the architecture its checkpoints name (transformers' class; vLLM registers the same names)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
LINEAR = re.compile(r"self\.(\w+)\s*(?::[^=]+)?=\s*(?:\w+\.)*(\w*Linear)\(")
IMPORTED = re.compile(r"from (?:vllm\.model_executor\.models)?\.(\w+) import")


def linear_names(module) -> set[str]:
    """The attribute names of linear layers in a vLLM model module and in the model modules it imports from."""
    source = inspect.getsource(module)
    names = {m[0] for m in LINEAR.findall(source)}
    for other in set(IMPORTED.findall(source)) - {"interfaces", "utils", "module_mapping", "interfaces_base"}:
        try:
            names |= {
                m[0]
                for m in LINEAR.findall(
                    inspect.getsource(importlib.import_module(f"vllm.model_executor.models.{other}"))
                )
            }
        except (ImportError, OSError):
            continue
    return names


def servable(arch: str) -> dict:
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module_name, class_name = _VLLM_MODELS[arch]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    cls = getattr(module, class_name)
    if not supports_lora(cls):
        return {"class": class_name, "supports_lora": False, "modules": []}
    packed = getattr(cls, "packed_modules_mapping", {}) or {}
    # the Transformers modelling backend swaps every linear layer of the transformers model for vLLM's: any name
    modules = {"*"} if module_name == "transformers" else set()
    for name in linear_names(module) if not modules else ():
        modules |= set(packed.get(name, [name]))
    modules |= set(getattr(cls, "embedding_modules", {}) or {})
    return {"class": class_name, "supports_lora": True, "modules": sorted(modules)}


def main() -> None:
    import vllm

    table = {t: servable(a) for t, a in ARCHITECTURES.items()}
    json.dump({"vllm": vllm.__version__, "models": table}, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
