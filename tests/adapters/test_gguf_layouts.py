"""export-gguf's per-architecture rules (gguf_export.LAYOUTS) without a server: the row re-orders, and refusals that
name what is supported. llama.cpp itself serves every family in test_llama_cpp_serving.py (marker `serve`)."""

import pytest
import torch

from ailora_tools.adapters.gguf_export import LAYOUTS, gguf_tensors, neox_qkv_rows
from ailora_tools.errors import UnsupportedError
from ailora_tools.io.peft_adapter import Adapter

CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def adapter(*modules: str, **config) -> Adapter:
    g = torch.Generator().manual_seed(0)
    factors = {m: (torch.randn(2, 8, generator=g), torch.randn(12, 2, generator=g)) for m in modules}
    return Adapter({"r": 2, "lora_alpha": 2, **config}, factors, {})


def test_neox_rows_become_q_then_k_then_v():
    n_head, d = 4, 3  # GPT-NeoX's query_key_value rows: per head, its q, k and v rows
    label = torch.tensor([[h, part, i] for h in range(n_head) for part in range(3) for i in range(d)])
    out = neox_qkv_rows(label, n_head)
    assert out.tolist() == [[h, part, i] for part in range(3) for h in range(n_head) for i in range(d)]


def test_every_family_maps_its_targets_and_keeps_a_by_b():
    modules = {
        "gpt2": "transformer.h.1.attn.c_attn",
        "gpt_neox": "gpt_neox.layers.1.attention.query_key_value",
        "phi3": "model.layers.1.self_attn.qkv_proj",
    }
    for model_type in LAYOUTS:
        module = modules.get(model_type, "model.layers.1.self_attn.v_proj")
        ad = adapter(module, fan_in_fan_out=model_type == "gpt2")
        _, alpha, tensors = gguf_tensors(ad, {**CONFIG, "model_type": model_type})
        (name_a, a), (name_b, b) = sorted(tensors.items())
        assert name_a.startswith("blk.1.attn_") and name_a.endswith(".weight.lora_a")
        A, B = ad.factors[module]
        assert torch.equal(torch.from_numpy(a), A) and alpha == 2
        assert torch.equal(torch.from_numpy(b), neox_qkv_rows(B, 4) if model_type == "gpt_neox" else B)


@pytest.mark.parametrize(
    ("model_type", "module", "config", "needle"),
    [
        ("bert", "encoder.layer.0.attention.self.query", {}, "architecture 'bert' is not supported; supported"),
        ("qwen3_moe", "model.layers.0.mlp.gate", {}, "mixture-of-experts expert or router"),
        ("mixtral", "model.layers.0.mlp.experts.0.w1", {}, "mixture-of-experts expert or router"),
        ("llama", "model.layers.0.self_attn.q_proj", {"fan_in_fan_out": True}, "supported on GPT-2 only"),
        ("llama", "model.layers.0.self_attn.rotary", {}, "has no llama.cpp tensor in a llama model"),
    ],
)
def test_what_llama_cpp_cannot_take_is_refused_by_name(model_type, module, config, needle):
    with pytest.raises(UnsupportedError, match=needle):
        gguf_tensors(adapter(module, **config), {**CONFIG, "model_type": model_type})
