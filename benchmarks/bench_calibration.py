"""LoRA-DA calibration: the layer-wise engine against the whole model with hooks (the authors' way).

Synthetic Llama-style checkpoints (synthetic.py); random calibration samples whose first quarter is a
prompt without loss; targets q_proj and v_proj of every layer. Each workload runs as its own process,
rounds interleaved: wall time (median), peak RSS of that process (VmHWM), its growth over the RSS
after imports, the engine's bound on that growth (`memory_bound`), and how far its G and Z of two
modules are from the reference's. The markdown table goes to benchmarks/results/. Nothing
here is asserted.

    python benchmarks/bench_calibration.py                                   # 170m and tinyllama, 8 x 64 tokens
    python benchmarks/bench_calibration.py --sizes tinyllama --samples 64 --tokens 512 --device cuda
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

from bench_decompose import describe_machine, run_arguments, write_report

HERE = Path(__file__).parent
PY = sys.executable
CHECKED = ("model.layers.0.self_attn.q_proj", "model.layers.{last}.self_attn.v_proj")


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(kind: str, model: str, work: Path, batch_size: int, device: str) -> None:
    """One workload: compute the statistics; keep those of the CHECKED modules in work/<kind>-<batch>.safetensors
    and the RSS before the work (all imports done) and at its peak in work/<kind>-<batch>.json."""
    import torch
    from safetensors.torch import save_file

    from ailora_tools.init.lora_da.calibration import calibrate
    from ailora_tools.io.examples import Example
    from ailora_tools.testing.calibration_reference import reference_statistics

    data = json.loads((work / "data.json").read_text())
    examples = [Example(e["input_ids"], e["labels"]) for e in data["examples"]]
    checked = [c.format(last=data["layers"] - 1) for c in CHECKED]
    keep, baseline, t0 = {}, vm("VmRSS"), time.perf_counter()
    if kind == "reference":
        for name, s in reference_statistics(model, examples, data["modules"], dtype=torch.bfloat16).items():
            if name in checked:
                keep[name + ".g"], keep[name + ".z"] = s["g"], s["z"]
    else:
        for s in calibrate(model, examples, data["modules"], device=device, batch_size=batch_size, progress=False):
            if s.name in checked:
                keep[s.name + ".g"], keep[s.name + ".z"] = s.gradient, s.input_factor.clone()
    (work / f"{kind}-{batch_size}.json").write_text(
        json.dumps({"baseline": baseline, "peak": vm("VmHWM"), "seconds": time.perf_counter() - t0})
    )
    save_file({k: v.contiguous() for k, v in keep.items()}, str(work / f"{kind}-{batch_size}.safetensors"))


def run(argv: list[str], probe: Path) -> dict:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
    )
    proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    rss = json.loads(probe.read_text())  # VmHWM: ru_maxrss would also count this process's RSS at fork time
    return {"seconds": seconds, "work": rss["seconds"], "rss": rss["peak"], "growth": rss["peak"] - rss["baseline"]}


def prepare(size: str, work: Path, samples: int, tokens: int) -> tuple[Path, dict]:
    """The synthetic checkpoint (written by another process, so that this one stays small) and data.json."""
    import random

    model = work / "model"
    if not (model / "model.safetensors.index.json").is_file():
        code = (
            f"import torch; from ailora_tools.testing.synthetic import SIZES, "
            f"synthetic_llama; synthetic_llama({str(model)!r}, dtype=torch.bfloat16, **SIZES[{size!r}])"
        )
        subprocess.run([PY, "-c", code], check=True)
    config = json.loads((model / "config.json").read_text())
    rng = random.Random(0)
    prompt = tokens // 4
    examples = [
        {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        for ids in ([rng.randrange(config["vocab_size"]) for _ in range(tokens)] for _ in range(samples))
    ]
    layers = config["num_hidden_layers"]
    modules = [f"model.layers.{i}.self_attn.{m}" for i in range(layers) for m in ("q_proj", "v_proj")]
    data = {"examples": examples, "modules": modules, "layers": layers}
    (work / "data.json").write_text(json.dumps(data))
    return model, data


def difference(work: Path, name: str) -> str:
    """Largest relative difference (to the reference's largest entry) of G and of Z over the checked modules."""
    from safetensors.torch import load_file

    ref, got = load_file(str(work / "reference-1.safetensors")), load_file(str(work / name))
    rel = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref}
    return (
        f"{max(v for k, v in rel.items() if k.endswith('.g')):.1e} / "
        f"{max(v for k, v in rel.items() if k.endswith('.z')):.1e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["170m", "tinyllama"], help="names from synthetic.SIZES")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="engine micro-batch sizes to run")
    run_arguments(p, rounds=1, workdir="/tmp/ailora-bench-calibration")
    p.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "WORK", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, model, work, batch = args.child
        return child(kind, model, Path(work), int(batch), args.device)
    from ailora_tools.init.lora_da.calibration import memory_bound

    lines = [
        f"# LoRA-DA calibration benchmark, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_calibration.py {' '.join(sys.argv[1:])}`",
        "",
        *describe_machine(args.device),
        f"- {args.samples} samples × {args.tokens} tokens (the first {args.tokens // 4} a prompt without loss), "
        "targets q_proj and v_proj of every layer, bfloat16 checkpoint and compute, "
        f"{args.rounds} round(s), each workload its own process (`sync` before each, untimed)",
        "- engine: `ailora_tools.init.lora_da.calibration.calibrate`, one decoder layer at a time; reference: "
        "`ailora_tools/testing/calibration_reference.py`, the whole model with hooks, one sample at a time (the "
        "authors' way)",
        "- difference: largest |engine − reference| / largest |reference| of G / of Z, over layer 0's q_proj "
        "and the last layer's v_proj (bfloat16 compute: the reference's G is the model's bfloat16 .grad, ours "
        "float32)",
        "",
    ]
    for size in args.sizes:
        work = args.workdir / size
        work.mkdir(parents=True, exist_ok=True)
        model, data = prepare(size, work, args.samples, args.tokens)
        config = json.loads((model / "config.json").read_text())
        size_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        jobs = {"whole model + hooks (reference)": ("reference", 1)}
        jobs.update({f"layer-wise engine, batch {b}": ("engine", b) for b in args.batch_sizes})
        results: dict[str, list[dict]] = {k: [] for k in jobs}
        for rnd in range(args.rounds):
            for name, (kind, batch) in jobs.items():
                r = run(
                    [PY, __file__, "--device", args.device, "--child", kind, str(model), str(work), str(batch)],
                    work / f"{kind}-{batch}.json",
                )
                results[name].append(r)
                print(f"[{size} round {rnd + 1}] {name}: {r['seconds']:.2f} s, {r['rss'] / 2**20:.0f} MiB", flush=True)
        lines += [
            f"## {size}: {size_bytes / 1e9:.2f} GB, {config['num_hidden_layers']} layers",
            "",
            "| workload | median s | of which work s | peak RSS MiB | growth MiB | bound MiB | difference G / Z |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, (kind, batch) in jobs.items():
            v = results[name]
            kept = min(
                1 << 30, (config["num_hidden_layers"] + 2) * args.samples * args.tokens * config["hidden_size"] * 2
            )
            if kind == "reference":
                bound = ""
            else:
                mib = (
                    memory_bound(
                        config, data["modules"], batch_size=batch, max_tokens=args.tokens, activation_budget=kept
                    )
                    / 2**20
                )
                bound = f"{mib:.0f}"
            diff = "0 (itself)" if kind == "reference" else difference(work, f"{kind}-{batch}.safetensors")
            lines.append(
                f"| {name} | {statistics.median(r['seconds'] for r in v):.2f} | "
                f"{statistics.median(r['work'] for r in v):.2f} | "
                f"{max(r['rss'] for r in v) / 2**20:.0f} | {max(r['growth'] for r in v) / 2**20:.0f} | "
                f"{bound} | {diff} |"
            )
        lines.append("")
    lines += [
        "Work: the child's time after its imports and reading the data (the rest is starting Python and "
        "importing torch and transformers). Peak RSS is the child's VmHWM. Growth: that less the RSS once torch, "
        "transformers and the code are imported; the "
        "engine's bound (`memory_bound`) is for that growth, taking as activation budget what these runs keep "
        "in RAM, (layers + 2) × samples × tokens × hidden × 2 bytes (under the default budget of 1 GiB).",
        "",
    ]
    write_report(args.out, "calibration", args.device, lines)


if __name__ == "__main__":
    main()
