"""One matrix, every method: time and accuracy of the kept subspace against a float64 reference.

Principal (r largest) and minor (r smallest) components of an n×n matrix with a realistic spectrum
(synthetic.spiked), on CPU and, when there is one, CUDA. Accuracy is the relative Frobenius error of the
rank-r projection U_r Σ_r V_rᵀ against float64 torch.linalg.svd. Nothing here is asserted.

    python benchmarks/bench_svd.py                        # 1024 2048 4096 on the CPU
    python benchmarks/bench_svd.py --sizes 1024 2048 4096 8192 --devices cpu cuda
    python benchmarks/bench_svd.py --sizes 8192 --repeats 1 --no-warmup --methods ailora-tools   # ours only
"""

from __future__ import annotations

import argparse
import datetime
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
from ailora_tools.testing.synthetic import spiked  # noqa: E402


def _svd(W, r, largest, dtype):
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    sl = slice(0, r) if largest else slice(-r, None)
    return U[:, sl], S[sl], Vh[sl]


def _gram(W, r, largest, dtype):
    G = W.to(dtype) @ W.to(dtype).T
    evals, evecs = torch.linalg.eigh(G)
    X = evecs[:, -r:] if largest else evecs[:, :r]
    P = X.T @ W.to(dtype)
    S = P.norm(dim=1)
    return X, S, P / S[:, None]


def _lowrank(W, r, _largest):
    U, S, V = torch.svd_lowrank(W.float(), q=r, niter=4)
    return U, S, V.T


def _ours(mode):
    def run(W, r, largest):
        role = "principal" if largest else "minor"
        t = triplets(W, r, role, mode=mode, generator=generator_for(0, "bench", W.device))
        return t.U, t.S, t.Vh

    return run


METHODS = {  # name -> (fn(W, r, largest), roles it applies to)
    "torch.linalg.svd float32 (PEFT pissa)": (lambda W, r, lg: _svd(W, r, lg, torch.float32), ("principal", "minor")),
    "svd_lowrank niter=4 (PEFT pissa_niter_4)": (_lowrank, ("principal",)),
    "Gram eigh float32": (lambda W, r, lg: _gram(W, r, lg, torch.float32), ("principal", "minor")),
    "Gram eigh float64": (lambda W, r, lg: _gram(W, r, lg, torch.float64), ("principal", "minor")),
    "ailora-tools randomized": (_ours("randomized"), ("principal",)),
    "ailora-tools exact": (_ours("exact"), ("principal", "minor")),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first call (fine on CPU at large n)")
    p.add_argument("--methods", nargs="*", default=None, help="run only methods whose name contains one of these")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    methods = {k: v for k, v in METHODS.items() if not args.methods or any(m in k for m in args.methods)}
    lines = [
        f"# SVD methods, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_svd.py {shlex.join(sys.argv[1:])}`",
        "",
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, devices {' '.join(args.devices)}"
        + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        f"- rank {args.rank}; n×n matrices with a spiked spectrum; error = relative Frobenius error of the rank-r "
        "projection against float64 torch.linalg.svd; time = median of repeats",
        "",
        "| device | n | role | method | seconds | error |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for device in map(torch.device, args.devices):
        for n in args.sizes:
            W = spiked(n, n, torch.Generator().manual_seed(n)).to(device)
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            refs = {
                "principal": (U[:, : args.rank] * S[: args.rank]) @ Vh[: args.rank],
                "minor": (U[:, -args.rank :] * S[-args.rank :]) @ Vh[-args.rank :],
            }
            del U, S, Vh
            for name, (fn, roles) in methods.items():
                for role in roles:
                    if not args.no_warmup:
                        fn(W, args.rank, role == "principal")  # warm-up (CUDA kernels, LAPACK)
                    times = []
                    for _ in range(args.repeats):
                        sync(device)
                        t0 = time.perf_counter()
                        u, s, vh = fn(W, args.rank, role == "principal")
                        sync(device)
                        times.append(time.perf_counter() - t0)
                    err = float(((u.double() * s.double()) @ vh.double() - refs[role]).norm() / refs[role].norm())
                    lines.append(
                        f"| {device.type} | {n} | {role} | {name} | {statistics.median(times):.4f} | {err:.1e} |"
                    )
                    print(lines[-1], flush=True)
    devices = "-".join(d.split(":")[0] for d in args.devices)
    print(f"wrote {write_report(args.out, 'svd-' + devices, '-'.join(map(str, args.sizes)), lines)}")


if __name__ == "__main__":
    main()
