"""A synthetic Llama-style checkpoint, written shard by shard and tensor by tensor (never a shard in memory).

q_proj and v_proj get a realistic spectrum (a random bulk plus a few dozen decaying spikes, as pretrained
attention weights have); they are what decompose reads. The other matrices only have to be copied, hashed
and loaded, so they are filled fast from one block of Gaussian values (0.02 scale) repeated, written at disk
speed: Llama-3.1-8B's shape (16 GB) takes about as long to build as to copy, plus a few seconds of spikes.
Layers are spread over shards like Hugging Face's sharded saves, embeddings in the first, the head in the last.

Sizes: the names in SIZES, and "70b-layers:N" (N decoder layers of Llama-3.1-70B's shape, 1.7 GB each in
bfloat16, plus its 2.1 GB embedding and head).
"""

import json
import os
import struct

import torch

SIZES = {  # name -> shape; "tinyllama" is TinyLlama-1.1B's, "8b" Llama-3.1-8B's
    "tiny": dict(layers=2, hidden=128, inter=256, kv=2, vocab=512, shards=2),
    "170m": dict(layers=10, hidden=1024, inter=2816, kv=4, vocab=32000, shards=2),
    "tinyllama": dict(layers=22, hidden=2048, inter=5632, kv=4, vocab=32000, shards=5),
    "3b": dict(layers=26, hidden=3072, inter=8192, kv=8, vocab=32000, shards=7),
    "8b": dict(layers=32, hidden=4096, inter=14336, kv=8, vocab=128256, head_dim=128, shards=4),
}
LLAMA_70B_LAYER = dict(hidden=8192, inter=28672, kv=8, vocab=128256, head_dim=128, per_shard=3)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
FILL_ELEMENTS = 1 << 22  # the repeated block of Gaussian values: 8 MiB in bfloat16


def size_spec(name: str) -> dict:
    """The synthetic_llama keyword arguments for a size name ("8b", "70b-layers:8", ...)."""
    if name.startswith("70b-layers:"):
        return dict(LLAMA_70B_LAYER, layers=int(name.split(":", 1)[1]))
    return SIZES[name]


def spiked(m: int, n: int, g: torch.Generator, spikes: int = 64) -> torch.Tensor:
    """0.02-scale Gaussian bulk plus `spikes` rank-one terms with power-law decaying strength."""
    w = torch.randn(m, n, generator=g) * 0.02
    a, b = torch.randn(m, spikes, generator=g), torch.randn(n, spikes, generator=g)
    s = 3.0 * torch.arange(1, spikes + 1, dtype=torch.float32) ** -0.8
    return w + (a * s) @ b.T / (m * n) ** 0.25


def powerlaw(n: int, exponent: float, seed: int) -> torch.Tensor:
    """An n×n float32 matrix with σ_i ∝ i^-exponent and random singular vectors (seeded)."""
    g = torch.Generator().manual_seed(seed)
    U, V = (torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q for _ in range(2))
    return ((U * torch.arange(1, n + 1, dtype=torch.float64) ** -exponent) @ V.T).float()


def synthetic_llama(
    path, *, layers, hidden, inter, kv, vocab, dtype=torch.float32, shards=None, per_shard=None, head_dim=64, seed=0
):
    """Write config.json, the shards and model.safetensors.index.json; return the directory."""
    os.makedirs(path, exist_ok=True)
    heads = max(1, hidden // head_dim)
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    }
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(seed)
    fill = (torch.randn(FILL_ELEMENTS, generator=g) * 0.02).to(dtype)

    def filled(*shape):
        return ("fill", shape)

    def targets(m, n):
        return ("spiked", (m, n))

    def ones(n):
        return ("ones", (n,))

    per_shard = per_shard or -(-layers // (shards or layers))
    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    weight_map, total = {}, 0
    for si, group in enumerate(groups):
        t = {}
        if si == 0:
            t["model.embed_tokens.weight"] = filled(vocab, hidden)
        for layer in group:
            p = f"model.layers.{layer}."
            t[p + "self_attn.q_proj.weight"] = targets(heads * head_dim, hidden)
            t[p + "self_attn.k_proj.weight"] = filled(kv * head_dim, hidden)
            t[p + "self_attn.v_proj.weight"] = targets(kv * head_dim, hidden)
            t[p + "self_attn.o_proj.weight"] = filled(hidden, heads * head_dim)
            t[p + "mlp.gate_proj.weight"] = filled(inter, hidden)
            t[p + "mlp.up_proj.weight"] = filled(inter, hidden)
            t[p + "mlp.down_proj.weight"] = filled(hidden, inter)
            t[p + "input_layernorm.weight"] = ones(hidden)
            t[p + "post_attention_layernorm.weight"] = ones(hidden)
        if si == len(groups) - 1:
            t["model.norm.weight"] = ones(hidden)
            t["lm_head.weight"] = filled(vocab, hidden)
        name = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        total += _write_shard(f"{path}/{name}", t, dtype, fill, g)
        weight_map.update({k: name for k in t})
    with open(f"{path}/model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


def _write_shard(path: str, tensors: dict, dtype: torch.dtype, fill: torch.Tensor, g: torch.Generator) -> int:
    """Stream one safetensors file: header, then each tensor's bytes in order. Returns the data size."""
    item = torch.empty((), dtype=dtype).element_size()
    doc, at = {"__metadata__": {"format": "pt"}}, 0
    for name, (_, shape) in tensors.items():
        n = item
        for d in shape:
            n *= d
        doc[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    js = json.dumps(doc, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    block = memoryview(fill.view(torch.uint8).numpy().tobytes())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        for name, (kind, shape) in tensors.items():
            begin, end = doc[name]["data_offsets"]
            if kind == "fill":
                for start in range(0, end - begin, len(block)):
                    f.write(block[: min(len(block), end - begin - start)])
            else:
                value = spiked(*shape, g) if kind == "spiked" else torch.ones(shape)
                f.write(value.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return at
