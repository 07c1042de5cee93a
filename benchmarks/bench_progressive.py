"""Progtuning throughput: tokens/s per stage of `train --progressive K` against plain training, same steps.

A Llama-style model (random weights, the demo's character tokenizer) is decomposed (AILoRA, q_proj and
v_proj); then plain training and `--progressive K` each run as their own process through the CLI, rounds
interleaved, on the same data, steps and seed. Per stage: the blocks it updates, tokens/s of both runs over
that stage's steps (from metrics.jsonl: forward + backward + optimizer, no eval), and the speed-up; also the
fraction of updated parameter-steps and the final eval loss of both. The table goes to benchmarks/results/.
Nothing here is asserted.

    python benchmarks/bench_progressive.py   # 8 blocks, hidden 256, 4 stages, 40 steps, 2 rounds (~3 min on 2 cores)
    python benchmarks/bench_progressive.py --layers 16 --hidden 512 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench_decompose import run_arguments, train_args, write_report

HERE = Path(__file__).parent


def build(work: Path, *, layers: int, hidden: int, seq: int, examples: int) -> tuple[Path, Path, Path]:
    """The model (demo tokenizer), its AILoRA decomposition, and train/eval JSONL of about `seq` characters each."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ailora_tools import decompose
    from ailora_tools.demo import build_tiny_model

    tok_dir = build_tiny_model(work / "tok")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=max(512, seq),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "model")
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, work / "model" / f.name)
    decompose(work / "model", work / "dec", rank=16, progress=False)
    rng = random.Random(0)

    def line() -> str:
        text = ""
        while len(text) < seq:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            text += f"Q: {a} + {b} = ? A: {a + b}\n"
        return json.dumps({"text": text[:seq]})

    for name, n in (("train.jsonl", examples), ("eval.jsonl", 32)):
        (work / name).write_text("\n".join(line() for _ in range(n)) + "\n")
    return work / "dec", work / "train.jsonl", work / "eval.jsonl"


def train_run(dec: Path, data: Path, evals: Path, out: Path, args, stages: int | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "ailora_tools.cli"] + train_args(
        dec, data, out, "--eval-data", evals, "--max-steps", args.steps, "--batch-size", args.batch_size
    )
    argv += ["--max-length", str(args.seq), "--lr", "1e-3", "--device", args.device, "--json"]
    argv += ["--progressive", str(stages)] if stages else []
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    summary["metrics"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def tokens_per_s(metrics: list[dict], steps: list[int]) -> float:
    """Median over the steps of tokens/s; step 1 (warm-up: allocations, first kernels) left out unless alone."""
    rows = [m for m in metrics if "seconds" in m and steps[0] <= m["step"] <= steps[1]]
    return statistics.median(
        m["tokens"] / m["seconds"] for m in (rows[1:] if rows[0]["step"] == 1 and len(rows) > 1 else rows)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128, help="characters (= tokens) per example")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stages", type=int, default=4)
    run_arguments(p, rounds=2, workdir="bench-progressive")
    args = p.parse_args()

    import torch

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    dec, data, evals = build(
        args.workdir, layers=args.layers, hidden=args.hidden, seq=args.seq, examples=args.steps * args.batch_size
    )
    runs: dict[str, list[dict]] = {"plain": [], "progressive": []}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, stages in (("plain", None), ("progressive", args.stages)):
            runs[name].append(train_run(dec, data, evals, args.workdir / f"{name}-{r}", args, stages))
            print(f"round {r + 1} {name}: {runs[name][-1]['tokens_per_s']} tokens/s", flush=True)
            load.append(os.getloadavg()[0])
    stages = runs["progressive"][0]["progressive"]["stages"]
    med = lambda name, steps: statistics.median(tokens_per_s(s["metrics"], steps) for s in runs[name])  # noqa: E731
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    lines = [
        f"# Progtuning throughput, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_progressive.py {' '.join(sys.argv[1:])}`",
        "",
        f"- {platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; 1-minute load average {min(load):.1f}–{max(load):.1f} during the "
        "runs (above the core count, other processes shared the cores and the figures carry their noise)",
        f"- Llama-style, {args.layers} blocks, hidden {args.hidden}, random weights; AILoRA r = 16 on q_proj and "
        f"v_proj; {args.steps} steps of {args.batch_size} × {args.seq} tokens; float32; median of {args.rounds} "
        "round(s); tokens/s = median over each stage's steps of one step's tokens / its seconds (forward + "
        "backward + optimizer step; no eval; step 1, the warm-up, left out)",
        "",
        "| stage | blocks updated | steps | plain tokens/s | progressive tokens/s | speed-up |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for s in stages:
        plain, prog = med("plain", s["steps"]), med("progressive", s["steps"])
        lines.append(
            f"| {s['stage']} | {s['blocks'][0]}–{s['blocks'][1]} of 0–{args.layers - 1} | "
            f"{s['steps'][0]}–{s['steps'][1]} | {plain:.0f} | {prog:.0f} | {prog / plain:.2f}× |"
        )
    whole = [1, args.steps]
    lines.append(
        f"| all | | {whole[0]}–{whole[1]} | {med('plain', whole):.0f} | {med('progressive', whole):.0f} | "
        f"{med('progressive', whole) / med('plain', whole):.2f}× |"
    )
    fraction = runs["progressive"][0]["progressive"]["updated_parameter_fraction"]
    lines += [
        "",
        f"Updated parameter-steps: {fraction:.1%} of plain training ({1 - fraction:.1%} fewer). "
        f"Final eval loss: plain {statistics.median(s['eval_loss'] for s in runs['plain']):.4f}, progressive "
        f"{statistics.median(s['eval_loss'] for s in runs['progressive']):.4f} "
        f"(start {runs['plain'][0]['eval_loss_start']:.4f}).",
    ]
    print(f"wrote {write_report(args.out, 'progressive', args.device, lines)}")


if __name__ == "__main__":
    main()
