"""A synthetic Llama-style checkpoint, written shard by shard (never the whole model in memory).

q_proj and v_proj get a realistic spectrum (a random bulk plus a few dozen decaying spikes, as pretrained
attention weights have), the other matrices are random. Layers are spread over `shards` files like
Hugging Face's sharded saves, embeddings in the first and the head in the last.
"""
import json
import os

import torch
from safetensors.torch import save_file

SIZES = {  # name -> shape; "tinyllama" is TinyLlama-1.1B's
    "tiny": dict(layers=2, hidden=128, inter=256, kv=2, vocab=512, shards=2),
    "170m": dict(layers=10, hidden=1024, inter=2816, kv=4, vocab=32000, shards=2),
    "tinyllama": dict(layers=22, hidden=2048, inter=5632, kv=4, vocab=32000, shards=5),
    "3b": dict(layers=26, hidden=3072, inter=8192, kv=8, vocab=32000, shards=7),
}


def spiked(m: int, n: int, g: torch.Generator, spikes: int = 64) -> torch.Tensor:
    """0.02-scale Gaussian bulk plus `spikes` rank-one terms with power-law decaying strength."""
    w = torch.randn(m, n, generator=g) * 0.02
    a, b = torch.randn(m, spikes, generator=g), torch.randn(n, spikes, generator=g)
    s = 3.0 * torch.arange(1, spikes + 1, dtype=torch.float32) ** -0.8
    return w + (a * s) @ b.T / (m * n) ** 0.25


def synthetic_llama(path, *, layers, hidden, inter, kv, vocab, dtype=torch.float32, shards=None, per_shard=None,
                    head_dim=64, seed=0):
    """Write config.json, the shards and model.safetensors.index.json; return the directory."""
    os.makedirs(path, exist_ok=True)
    heads = max(1, hidden // head_dim)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
           "hidden_act": "silu", "rope_theta": 10000.0}
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(seed)
    per_shard = per_shard or -(-layers // (shards or layers))
    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    weight_map, total = {}, 0
    for si, group in enumerate(groups):
        t = {}
        if si == 0:
            t["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
        for layer in group:
            p = f"model.layers.{layer}."
            t[p + "self_attn.q_proj.weight"] = spiked(heads * head_dim, hidden, g)
            t[p + "self_attn.k_proj.weight"] = torch.randn(kv * head_dim, hidden, generator=g) * 0.02
            t[p + "self_attn.v_proj.weight"] = spiked(kv * head_dim, hidden, g)
            t[p + "self_attn.o_proj.weight"] = torch.randn(hidden, heads * head_dim, generator=g) * 0.02
            t[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.02
            t[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.02
            t[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) * 0.02
            t[p + "input_layernorm.weight"] = torch.ones(hidden)
            t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        if si == len(groups) - 1:
            t["model.norm.weight"] = torch.ones(hidden)
            t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
        t = {k: v.to(dtype) for k, v in t.items()}
        name = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(t, f"{path}/{name}", metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * v.element_size() for v in t.values())
        del t
    with open(f"{path}/model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
