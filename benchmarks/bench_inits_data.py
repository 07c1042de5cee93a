"""corda, lora-ga and eva: `decompose` (layer-streamed calibration, then the residual written shard by shard) against
PEFT's own init (the whole model loaded, `preprocess_corda` / `preprocess_loraga` over the same samples one at a time,
then `get_peft_model`; EVA: `get_peft_model`, then `initialize_lora_eva_weights` on one batch of the samples) on the
same Llama-3.2-1B-shaped checkpoint with its layers cut down (synthetic, bfloat16 or float32).

Each workload runs as its own process: wall time and peak RSS (VmHWM), and its growth over the RSS after imports.
Targets q_proj, v_proj, down_proj of every layer, rank 8, the demo's calibration data and tokenizer. The markdown
table goes to benchmarks/results/. Nothing here is asserted.

    python benchmarks/bench_inits_data.py --layers 2   # results/inits-data-cpu-2026-12-06.md: over an hour
                                                       # on 2 loaded cores (CorDA's 8192² work, a bfloat16 backward)
    python benchmarks/bench_inits_data.py --layers 2 --methods lora-ga,eva --dtype float32
                                                       # results/inits-data-float32-cpu-DATE.md (a float32 checkpoint:
                                                       # the CPU's bfloat16 backward is what made LoRA-GA slow)
    python benchmarks/bench_inits_data.py --layers 16 --vocab 128256   # the full 1B shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
TARGETS, RANK = ("q_proj", "v_proj", "down_proj"), 8


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(kind: str, method: str, model: str, work: Path, samples: int, dtype: str) -> None:
    """One workload; writes work/<kind>-<method>.json with the RSS after imports, the peak and the seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    from ailora_tools.decomposition import decompose
    from ailora_tools.demo import data_file
    from ailora_tools.testing.peft_data_inits import calibration_rows, peft_init

    torch.set_num_threads(2)
    data = data_file("demo_train.jsonl")
    baseline, t0 = vm("VmRSS"), time.perf_counter()
    if kind == "ours":
        decompose(
            model,
            work / f"out-{method}",
            method=method,
            rank=RANK,
            targets=TARGETS,
            data=data,
            samples=samples,
            max_length=128,
            device="cpu",
            progress=False,
            overwrite=True,
        )
    else:
        rows = calibration_rows(model, data, "causal-lm", samples, 128)
        net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        peft_init(net, method, rows, rank=RANK, alpha=RANK, targets=TARGETS)
    (work / f"{kind}-{method}.json").write_text(
        json.dumps({"baseline": baseline, "peak": vm("VmHWM"), "seconds": time.perf_counter() - t0})
    )


def build(path: Path, layers: int, vocab: int, dtype: str) -> Path:
    import torch

    from ailora_tools.demo import build_tiny_model
    from ailora_tools.testing.synthetic import synthetic_llama

    synthetic_llama(
        path,
        layers=layers,
        hidden=2048,
        inter=8192,
        kv=8,
        vocab=vocab,
        head_dim=64,
        dtype=getattr(torch, dtype),
        per_shard=2,
    )
    tok = build_tiny_model(path.parent / "tok")
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--methods", default="corda,lora-ga,eva")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the checkpoint's dtype")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build(work / "model", args.layers, args.vocab, args.dtype)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        rows = []
        for method in args.methods.split(","):
            for kind in ("ours", "peft"):
                command = [__file__, "--child", kind, method, str(model), str(work), str(args.samples), args.dtype]
                subprocess.run([sys.executable, *command], check=True)
                r = json.loads((work / f"{kind}-{method}.json").read_text())
                rows.append((method, kind, r))
    gib = 1 << 30
    lines = [
        f"# bench_inits_data ({datetime.date.today()}): Llama-3.2-1B shape, {args.layers} layers, vocabulary "
        f"{args.vocab}, {args.dtype} ({size / gib:.2f} GiB); targets {','.join(TARGETS)}, rank {RANK}, "
        f"{args.samples} samples",
        "",
        "| method | init | seconds | peak RSS GiB | growth GiB | peak vs PEFT | time vs PEFT |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(m, k): r for m, k, r in rows}
    for method, kind, r in rows:
        peft = by[(method, "peft")]
        lines.append(
            f"| {method} | {kind} | {r['seconds']:.1f} | {r['peak'] / gib:.2f} | "
            f"{(r['peak'] - r['baseline']) / gib:.2f} | {r['peak'] / peft['peak']:.2f} | "
            f"{r['seconds'] / peft['seconds']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if args.dtype == "bfloat16" else f"-{args.dtype}"
    out = HERE / "results" / f"inits-data{suffix}-cpu-{datetime.date.today()}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    else:
        main()
