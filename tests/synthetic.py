"""A synthetic Llama-style checkpoint written tensor group by tensor group (never the whole model in memory)."""
import json
import os

import torch
from safetensors.torch import save_file


def synthetic_llama(path, *, layers, hidden, inter, kv, vocab, dtype=torch.float32, per_shard=2):
    """Write config.json, one shard per `per_shard` layers plus one for embeddings, and the index."""
    os.makedirs(path, exist_ok=True)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": kv, "vocab_size": vocab,
           "head_dim": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    json.dump(cfg, open(f"{path}/config.json", "w"))
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    n = len(groups) + 1
    for si, group in enumerate(groups):
        t = {}
        for l in group:
            p = f"model.layers.{l}."
            t[p+"self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"self_attn.k_proj.weight"] = torch.randn(kv*64, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"self_attn.v_proj.weight"] = torch.randn(kv*64, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g, dtype=dtype) * 0.02
            t[p+"mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g, dtype=dtype) * 0.02
            t[p+"input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
            t[p+"post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        name = f"model-{si+1:05d}-of-{n:05d}.safetensors"
        save_file(t, f"{path}/{name}", metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * v.element_size() for v in t.values())
        del t
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g, dtype=dtype)*0.02,
         "lm_head.weight": torch.randn(vocab, hidden, generator=g, dtype=dtype)*0.02, "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(t, f"{path}/{name}", metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    total += sum(v.numel() * v.element_size() for v in t.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(f"{path}/model.safetensors.index.json", "w"))
