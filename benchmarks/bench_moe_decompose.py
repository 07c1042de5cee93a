"""Decompose of a mixture-of-experts checkpoint (expert targets) against copying it: time and peak RSS.

The checkpoint is synthetic with Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768, 32 query and 4 KV heads of
128, one matrix per expert as its checkpoints store them), layers cut down (`--layers`) and the vocabulary too
(`--vocab`; embeddings only have to be copied). Every expert matrix is decomposed on its own, one at a time, so
decompose's peak memory should stay flat in the number of experts: the run with `--experts` halved shows it.

    python benchmarks/bench_moe_decompose.py --layers 2            # ~2.4 GB of experts in bfloat16
    python benchmarks/bench_moe_decompose.py --size tiny           # seconds (the smoke test)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
QWEN3_30B_A3B = dict(hidden=2048, experts=128, moe_inter=768, heads=32, kv=4, head_dim=128)
TINY = dict(hidden=64, experts=8, moe_inter=32, heads=4, kv=2, head_dim=16)


def build(path: Path, shape: dict, layers: int, vocab: int) -> int:
    """Write the checkpoint, one shard per layer (never more than one layer in memory); return its size in bytes."""
    path.mkdir(parents=True, exist_ok=True)
    h, e, i, d = shape["hidden"], shape["experts"], shape["moe_inter"], shape["head_dim"]
    gen, index, dt = torch.Generator().manual_seed(0), {}, torch.bfloat16

    def randn(*s):
        return (torch.randn(*s, generator=gen) * 0.02).to(dt)

    shards = [
        {
            "model.embed_tokens.weight": randn(vocab, h),
            "model.norm.weight": torch.ones(h, dtype=dt),
            "lm_head.weight": randn(vocab, h),
        }
    ]
    for n in range(layers):
        p = f"model.layers.{n}"
        t = {
            f"{p}.self_attn.q_proj.weight": randn(shape["heads"] * d, h),
            f"{p}.self_attn.k_proj.weight": randn(shape["kv"] * d, h),
            f"{p}.self_attn.v_proj.weight": randn(shape["kv"] * d, h),
            f"{p}.self_attn.o_proj.weight": randn(h, shape["heads"] * d),
            f"{p}.self_attn.q_norm.weight": torch.ones(d, dtype=dt),
            f"{p}.self_attn.k_norm.weight": torch.ones(d, dtype=dt),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=dt),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=dt),
            f"{p}.mlp.gate.weight": randn(e, h),
        }
        for x in range(e):
            t |= {
                f"{p}.mlp.experts.{x}.gate_proj.weight": randn(i, h),
                f"{p}.mlp.experts.{x}.up_proj.weight": randn(i, h),
                f"{p}.mlp.experts.{x}.down_proj.weight": randn(h, i),
            }
        shards.append(t)
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        index |= {t: name for t in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": h,
        "num_experts": e,
        "moe_intermediate_size": i,
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv"],
        "head_dim": d,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "num_experts_per_tok": 8,
        "intermediate_size": 6144,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    return sum(f.stat().st_size for f in path.iterdir())


def run(argv: list[str]) -> dict:
    """Run a command under /usr/bin/time; its seconds and peak RSS (bytes), the command's own (not this process')."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.decode()[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "rss": int(proc.stderr.decode().split()[-1]) * 1024}


def measure(model: Path, work: Path, rank: int) -> dict[str, dict]:
    cli = [sys.executable, "-m", "ailora_tools.cli", "decompose", str(model), "--rank", str(rank), "--targets"]
    out = {"copy (cp -r)": run(["cp", "-r", str(model), str(work / "copy")])}
    for method in ("pissa", "lora"):
        shutil.rmtree(work / method, ignore_errors=True)
        extra = ["--no-residual"] if method == "lora" else []
        out[f"decompose {method} experts"] = run(
            [*cli, "experts", "--method", method, "-o", str(work / method), *extra]
        )
    shutil.rmtree(work / "copy", ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["qwen3-30b-a3b", "tiny"], default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ailora-bench-moe"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args()
    shape = QWEN3_30B_A3B if a.size == "qwen3-30b-a3b" else TINY
    lines = [
        f"# decompose on a {a.size}-shaped MoE checkpoint ({a.layers} layers, vocab {a.vocab}), cpu",
        "",
        f"Command: `python benchmarks/bench_moe_decompose.py {' '.join(sys.argv[1:])}`; "
        f"{os.cpu_count()} cores, rank {a.rank}, bfloat16, targets `experts` (every expert's gate, up, down).",
        "",
    ]
    for experts in (shape["experts"] // 2, shape["experts"]):
        work = a.workdir / f"e{experts}"
        shutil.rmtree(work, ignore_errors=True)
        size = build(work / "model", {**shape, "experts": experts}, a.layers, a.vocab)
        results = measure(work / "model", work, a.rank)
        copy = results["copy (cp -r)"]
        lines += [
            f"## {experts} experts per layer: {size / 1e9:.2f} GB, {3 * experts * a.layers} expert matrices",
            "",
            "| workload | seconds | × copy | peak RSS (MB) |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {k} | {r['seconds']:.2f} | {r['seconds'] / copy['seconds']:.1f} | {r['rss'] / 2**20:.0f} |"
            for k, r in results.items()
        ]
        lines.append("")
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    report = a.out / f"moe-decompose-cpu-{a.size}-{date.today()}.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
