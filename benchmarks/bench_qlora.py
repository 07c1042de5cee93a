"""`train` on an NF4 residual (QPiSSA) against PEFT's QLoRA on the same model: tokens/s and peak memory (issue #24).

Workloads, each its own process (peak GPU memory and peak RSS are per workload), rounds interleaved:
- `decompose MODEL --method pissa --quantize nf4 --quantize-all --rank R` (wall time);
- `train --base OUT/residual --adapter OUT/adapter` on its output;
- PEFT's QLoRA (`peft_qlora.py`): MODEL quantised on load by transformers' BitsAndBytesConfig (NF4, double
  quantisation, the same linear layers in NF4 and the same compute dtype as the residual),
  `prepare_model_for_kbit_training` as PEFT's docs do, LoraConfig with the adapter's rank, alpha and targets, in
  a loop like `train`'s (AdamW, same lr and schedule, bfloat16 autocast on CUDA); and the same without
  `prepare_model_for_kbit_training` (which casts the embeddings, norms and head to float32).
Same data (fixed-length rows: every example --seq tokens), batch and steps. tokens/s is the median over the steps
after --warmup-steps of one step's tokens / seconds (forward + backward + optimizer step, from each run's
metrics.jsonl); peak GPU memory is torch.cuda.max_memory_allocated in the process (loading included), peak RSS
from os.wait4. The table goes to benchmarks/results/qlora-<device>-<date>.md. Nothing here is asserted.

    python benchmarks/bench_qlora.py --device cuda                      # TinyLlama-1.1B's shape, bf16, random weights
    python benchmarks/bench_qlora.py --device cuda --model /models/Llama-3.2-1B
    python benchmarks/bench_qlora.py                                    # CPU: a tiny Llama, ~1 min (a smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from bench_decompose import HERE, PY, decompose_args, describe_machine, run, train_args, write_report
from bench_progressive import tokens_per_s

ROOT = HERE.parent
from ailora_tools.testing.synthetic import size_spec, synthetic_llama  # noqa: E402

DEFAULTS = {
    "cuda": dict(size="tinyllama", steps=30, warmup_steps=5, rounds=3),  # --seq 512, --batch-size 4 on both
    # bitsandbytes compiles its CPU kernels in the first steps
    "cpu": dict(size="tiny", steps=14, warmup_steps=6, rounds=1),
}
PEFT = "PEFT QLoRA (prepare_model_for_kbit_training)"  # the baseline of the ratio column


def prepare(args) -> tuple[Path, Path, Path]:
    """The model (--model, or a synthetic Llama of --size in bfloat16), its tokenizer, and the training JSONL: rows of
    at least 4 × --seq characters (the demo's arithmetic lines), so that every example fills --seq tokens."""
    if args.model:
        model, tokenizer = args.model, args.model
    else:
        from ailora_tools.demo import build_tiny_model

        model, tokenizer = args.workdir / f"model-{args.size}", args.workdir / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            build_tiny_model(tokenizer)  # its character tokenizer: one token per character, ids far below any vocab
        if not (model / "model.safetensors.index.json").is_file():
            synthetic_llama(model, dtype=torch.bfloat16, **size_spec(args.size))
    demo = [json.loads(line) for line in (ROOT / "ailora_tools" / "data" / "demo_train.jsonl").read_text().splitlines()]
    lines = [r["prompt"] + r["completion"] + "\n" for r in demo]
    rows = []
    for i in range(args.steps * args.batch_size):
        text, j = "", i
        while len(text) < 4 * args.seq:
            text, j = text + lines[j % len(lines)], j + 7
        rows.append(json.dumps({"text": text}))
    data = args.workdir / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    return Path(model), Path(tokenizer), data


def workloads(model: Path, tokenizer: Path, data: Path, args) -> dict[str, list[str]]:
    dec, cli = args.workdir / "dec", [PY, str(HERE / "run_with_stats.py")]
    quant = ["--quantize", "nf4"] + ([] if args.quantize_targets_only else ["--quantize-all"])
    loop = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--device", args.device]
    checkpointing = ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    peft = [
        PY,
        str(HERE / "peft_qlora.py"),
        str(model),
        str(dec / "residual"),
        str(dec / "adapter"),
        str(tokenizer),
        str(data),
        "{out}",
        "--steps",
        str(args.steps),
        "--seq",
        str(args.seq),
        *loop,
        *checkpointing,
    ]
    return {
        f"decompose pissa {' '.join(quant)}": cli
        + decompose_args(model, "{out}", "--method", "pissa", "--rank", args.rank, *quant, "--device", args.device)
        + ["--quiet"]
        + (["--targets", args.targets] if args.targets else []),
        "ailora-tools train on the NF4 residual": cli
        + train_args(dec, data, "{out}", "--tokenizer", tokenizer, "--max-steps", args.steps, "--max-length", args.seq)
        + [*loop, *checkpointing, "--quiet"],
        PEFT: peft,
        "PEFT QLoRA, no prepare_model_for_kbit_training": peft + ["--no-prepare"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a local checkpoint (default: a synthetic Llama of --size)")
    p.add_argument("--size", help="testing.synthetic SIZES name (default: tinyllama on CUDA, tiny on CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda where there is one)")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup-steps", type=int, help="first steps left out of tokens/s")
    p.add_argument("--rounds", type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=512, help="tokens per example")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--targets", help="decompose --targets (default: decompose's)")
    p.add_argument(
        "--quantize-targets-only", action="store_true", help="NF4 for the targets only, not every linear layer"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ailora-bench/qlora"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.warmup_steps >= args.steps:
        p.error(f"--warmup-steps {args.warmup_steps}: leaves no step of --steps {args.steps} to measure")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, data = prepare(args)
    jobs = workloads(model, tokenizer, data, args)
    results: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(args.rounds):
        for name, argv in jobs.items():
            out = args.workdir / ("dec" if name.startswith("decompose") else "run")
            res = run(argv, out, args.workdir / "stats.json")
            if not name.startswith("decompose"):
                metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                res["tokens_per_s"] = tokens_per_s(metrics, [args.warmup_steps + 1, args.steps])
            results[name].append(res)
            rate = f", {res['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in res else ""
            print(f"round {r + 1} {name}: {res['seconds']:.1f} s{rate}", flush=True)
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    med = lambda name, key: statistics.median(r[key] for r in results[name])  # noqa: E731

    def gib(name, key):
        return f"{max(r[key] for r in results[name]) / 2**30:.2f}" if results[name][0][key] is not None else ""

    device = args.device.split(":")[0]
    what = (
        f"{args.model}"
        if args.model
        else f"synthetic Llama of testing.synthetic's {args.size!r} shape "
        f"({size_spec(args.size)}), bfloat16, random weights, the demo's character tokenizer"
    )
    lines = [
        f"# train on an NF4 residual against PEFT's QLoRA ({datetime.date.today()})",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_qlora.py', *sys.argv[1:]])}`",
        "",
        *describe_machine(args.device),
        f"- bitsandbytes {importlib.metadata.version('bitsandbytes')}",
        f"- model: {what}; PiSSA r = {args.rank}, "
        f"{'the targets' if args.quantize_targets_only else 'every linear layer but the head'} in NF4 (double "
        f"quantisation) on both sides; {args.steps} steps of {args.batch_size} × {args.seq} tokens, lr {args.lr}, "
        f"AdamW, cosine; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; median of "
        f"{args.rounds} round(s)",
        f"- tokens/s: median over steps {args.warmup_steps + 1}–{args.steps} of one step's tokens / seconds "
        "(forward + backward + optimizer step; start-up and warm-up steps left out); peak GPU: "
        "torch.cuda.max_memory_allocated in the process, loading included; peak RSS: os.wait4; wall s: the "
        "whole process (imports, loading, quantising, training, saving)",
        "",
        "| workload | tokens/s | × PEFT QLoRA | peak GPU GiB | peak RSS GiB | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        rate = f"{med(name, 'tokens_per_s'):.0f}" if "tokens_per_s" in runs[0] else ""
        ratio = f"{med(name, 'tokens_per_s') / med(PEFT, 'tokens_per_s'):.2f}×" if rate else ""
        lines.append(
            f"| {name} | {rate} | {ratio} | {gib(name, 'gpu')} | {gib(name, 'rss')} | {med(name, 'seconds'):.1f} |"
        )
    print(f"wrote {write_report(args.out, 'qlora', device, lines)}")


if __name__ == "__main__":
    main()
