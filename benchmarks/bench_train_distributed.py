"""train on N torchrun ranks against one process, each process with the same thread count.

Simulates N devices with N CPU processes of `--threads` BLAS threads each (torchrun's default is 1): the same
run (steps, global batch, data order) on 1 and N ranks; the table gives the median wall time, the training
tokens/s the run reports (steps only: no start-up, no evaluation) and the largest difference of the trained
adapter from the 1-rank one. Rounds are interleaved; medians go to benchmarks/results/. Nothing is asserted.

    python benchmarks/bench_train_distributed.py                           # hidden 512, 4 layers, 1 and 2 ranks
    python benchmarks/bench_train_distributed.py --ranks 1 2 4 8 --device cuda --threads 4 --hidden 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_decompose import HERE, PY, describe_machine, run_arguments, train_args, write_report


def prepare(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A synthetic Llama with the demo's character vocabulary, its tokenizer, and its decompose output."""
    model, tokenizer = work / "model", work / "tokenizer"
    if not (work / "dec" / "ailora.json").is_file():
        code = (
            f"from ailora_tools.testing.synthetic import "
            "synthetic_llama; from ailora_tools.demo import build_tiny_model; from ailora_tools import decompose; "
            f"from transformers import AutoTokenizer; build_tiny_model({str(tokenizer)!r}); "
            f"v = len(AutoTokenizer.from_pretrained({str(tokenizer)!r})); "
            f"synthetic_llama({str(model)!r}, layers={layers}, hidden={hidden}, inter={hidden * 2}, kv=2, "
            f"vocab=v); decompose({str(model)!r}, {str(work / 'dec')!r}, rank=16, progress=False)"
        )
        subprocess.run([PY, "-c", code], check=True)
    return work / "dec", tokenizer


def train(ranks: int, dec: Path, tokenizer: Path, out: Path, args) -> dict:
    launch = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [PY]
    data = HERE.parent / "ailora_tools" / "data" / "demo_train.jsonl"
    argv = [*launch, "-m", "ailora_tools.cli"] + train_args(
        dec, data, out, "--tokenizer", tokenizer, "--max-steps", args.steps, "--batch-size", args.batch_size
    )
    argv += ["--max-length", "128", "--device", args.device, "--json", "--overwrite"]
    t0 = time.perf_counter()
    ran = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if ran.returncode:
        sys.exit(ran.stderr)
    return {"seconds": time.perf_counter() - t0, **json.loads(ran.stdout)}


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per process (OMP_NUM_THREADS)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch, all ranks together")
    run_arguments(p, rounds=2, workdir="/tmp/ailora-bench/train-distributed")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    dec, tokenizer = prepare(args.workdir, args.hidden, args.layers)
    results: dict[int, list[dict]] = {n: [] for n in args.ranks}
    for r in range(args.rounds):
        for n in args.ranks:
            results[n].append(train(n, dec, tokenizer, args.workdir / f"out-{n}", args))
            print(f"round {r + 1}: {n} rank(s): {results[n][-1]['seconds']:.2f} s", flush=True)
    first = args.ranks[0]
    lines = [
        f"# train on torchrun ranks ({datetime.date.today()})",
        "",
        *describe_machine(args.device),
        f"- synthetic Llama, hidden {args.hidden}, {args.layers} layers, LoRA rank 16 (decompose defaults); "
        f"{args.steps} steps of {args.batch_size} examples (all ranks together), demo data (max 128 tokens); "
        f"{args.threads} BLAS thread(s) per process, median of {args.rounds} round(s), command: "
        f"`python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`",
        "",
        f"| ranks | median s (with start-up) | training tokens/s | × {first} rank(s) | max abs Δ adapter vs "
        f"{first} rank(s) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    rate = {n: statistics.median(x["tokens_per_s"] for x in v) for n, v in results.items()}
    for n, v in results.items():
        lines.append(
            f"| {n} | {statistics.median(x['seconds'] for x in v):.2f} | {rate[n]:.0f} | "
            f"{rate[n] / rate[first]:.2f}× | "
            f"{adapter_difference(args.workdir / f'out-{first}', args.workdir / f'out-{n}'):.1e} |"
        )
    write_report(args.out, "train-distributed", args.device, lines)


if __name__ == "__main__":
    main()
