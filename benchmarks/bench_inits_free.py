"""PEFT's data-free inits (olora, mica, orthogonal): `decompose --method M` against PEFT's own init on the same model.

PEFT's workflow is what its docs show: load the whole model, `get_peft_model(init_lora_weights=M)`, save the adapter
and, for olora (which rewrites the base), the residual model (`unload().save_pretrained`). Ours streams the
checkpoint (olora: the residual written tensor by tensor; mica and orthogonal: only the adapter). Each workload runs
as its own process, rounds interleaved; wall time (median) and the peak RSS of that process, as ratios against
PEFT's in the same run. The model is synthetic with TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 4 KV heads,
vocabulary 32000), bfloat16, its depth cut to --layers so that a run takes a minute or two on 2 cores.

Usage: python benchmarks/bench_inits_free.py [--layers 4] [--rank 16] [--rounds 2] [--workdir DIR] [--out DIR]
"""

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
PY = sys.executable
METHODS = ("olora", "mica", "orthogonal")
SHAPE = dict(hidden=2048, inter=5632, kv=4, vocab=32000)  # TinyLlama-1.1B's


def peft_run(method: str, model: str, out: str, rank: int) -> None:
    """PEFT's own init, as a user runs it (this script calls itself with --peft-run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=method)
    peft_model = get_peft_model(m, cfg)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    if method == "olora":  # the base was rewritten: the residual is part of the result
        peft_model.unload().save_pretrained(os.path.join(out, "residual"))


def workloads(model: Path, rank: int) -> dict[str, list[str]]:
    cli = [PY, "-m", "ailora_tools.cli"]
    jobs = {}
    for m in METHODS:
        jobs[f"ours {m}"] = cli + [
            "decompose",
            str(model),
            "-o",
            "{out}",
            "--method",
            m,
            "--rank",
            str(rank),
            "--device",
            "cpu",
            "--quiet",
        ]
        jobs[f"PEFT {m}"] = [
            PY,
            str(Path(__file__).absolute()),
            "--peft-run",
            m,
            str(model),
            "{out}",
            "--rank",
            str(rank),
        ]
    return jobs


def run(argv: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [a.replace("{out}", str(out)) for a in argv]
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"seconds": seconds, "rss": usage.ru_maxrss * 1024}


def prepare(work: Path, layers: int) -> Path:
    model = work / f"model-{layers}"
    if not (model / "model.safetensors.index.json").is_file():
        import torch

        from ailora_tools.testing.synthetic import synthetic_llama

        synthetic_llama(str(model), layers=layers, dtype=torch.bfloat16, shards=2, **SHAPE)
    return model


def report(results: dict[str, list[dict]], layers: int, rank: int, command: str) -> str:
    size = sum(f.stat().st_size for f in Path(results.pop("_model")).glob("*.safetensors")) / 2**30
    lines = [
        f"# PEFT's data-free inits: decompose vs PEFT's own init ({datetime.date.today()})",
        "",
        f"Command: `{command}`",
        "",
        f"TinyLlama-1.1B shapes, {layers} layers ({size:.2f} GB bfloat16), targets q_proj, v_proj, rank {rank}; "
        f"{os.cpu_count()} cores, CPU. Wall time: median over rounds; peak RSS: the process's maximum.",
        "",
        "| method | ours s | PEFT s | ours ÷ PEFT | ours peak RSS MiB | PEFT peak RSS MiB | RSS ours ÷ PEFT |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS:
        ours, peft = results[f"ours {m}"], results[f"PEFT {m}"]
        t_o, t_p = statistics.median(r["seconds"] for r in ours), statistics.median(r["seconds"] for r in peft)
        r_o, r_p = max(r["rss"] for r in ours) / 2**20, max(r["rss"] for r in peft) / 2**20
        lines.append(f"| {m} | {t_o:.2f} | {t_p:.2f} | {t_o / t_p:.2f} | {r_o:.0f} | {r_p:.0f} | {r_o / r_p:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-inits-free"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--peft-run", nargs=3, metavar=("METHOD", "MODEL", "OUT"))
    a = p.parse_args()
    if a.peft_run:
        return peft_run(*a.peft_run, rank=a.rank)
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare(a.workdir, a.layers)
    jobs = workloads(model, a.rank)
    results: dict = {k: [] for k in jobs}
    for rnd in range(a.rounds):
        for name, argv in jobs.items():
            r = run(argv, a.workdir / "out")
            results[name].append(r)
            print(f"[round {rnd + 1}] {name}: {r['seconds']:.2f} s, {r['rss'] / 2**20:.0f} MiB", flush=True)
    results["_model"] = str(model)
    command = f"python benchmarks/bench_inits_free.py --layers {a.layers} --rank {a.rank} --rounds {a.rounds}"
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"inits-free-cpu-{datetime.date.today()}.md"
    path.write_text(report(results, a.layers, a.rank, command))
    print(path)


if __name__ == "__main__":
    main()
