"""decompose and merge on N torchrun ranks against one process, each process with the same thread count.

Simulates N GPUs with N CPU processes: every process gets `--threads` BLAS threads (torchrun's default is 1),
so the 1-rank run is what one device does and the N-rank runs show what sharing the matrices out gains and
what the transfers to rank 0 cost. Outputs are checked byte-identical to the 1-rank run's. Rounds are
interleaved; medians go to benchmarks/results/. Nothing here is asserted.

    python benchmarks/bench_distributed.py                                  # tinyllama, 1 and 2 ranks, milora exact
    python benchmarks/bench_distributed.py --sizes 8b --ranks 1 2 4 8 --device cuda --threads 4
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench_decompose import (
    HERE,
    PY,
    decompose_args,
    describe_machine,
    prepare,
    run,
    run_arguments,
    write_report,
)


def workloads(model: Path, work: Path, ranks: int, method: str, svd: str, device: str, rank: int) -> dict:
    launch = (
        [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "ailora_tools.cli"]
        if ranks > 1
        else [PY, str(HERE / "run_with_stats.py")]
    )
    return {
        f"decompose {method} {svd}, {ranks} rank(s)": launch
        + decompose_args(
            model, "{out}", "--method", method, "--svd", svd, "--rank", rank, "--quiet", "--device", device
        ),
        f"merge, {ranks} rank(s)": launch
        + ["merge", str(work / "prep" / "residual"), str(work / "trained"), "-o", "{out}", "--quiet"],
    }


def digests(out: Path) -> dict[str, str]:
    """Every output file's sha256, less the files that name the output directory itself."""
    skip = {"ailora.json", "ailora-merge.json", "adapter/adapter_config.json"}

    def sha256(path: Path) -> str:  # in 8 MiB pieces: this process's peak RSS is passed on to the next workloads'
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()

    return {
        str(p.relative_to(out)): sha256(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and str(p.relative_to(out)) not in skip and ".work" not in p.parts
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tinyllama"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per process (OMP_NUM_THREADS)")
    p.add_argument("--method", default="milora", help="milora: every target's minor components, the most compute")
    p.add_argument("--svd", default="exact")
    run_arguments(p, rounds=2, workdir="/tmp/ailora-bench")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    lines = [
        f"# decompose and merge on torchrun ranks ({datetime.date.today()})",
        "",
        *describe_machine(args.device),
        f"- {args.threads} BLAS thread(s) per process, rank {args.rank}, median of {args.rounds} round(s), "
        f"command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`",
        "",
    ]
    for size in args.sizes:
        work = args.workdir / size
        model = prepare(size, work, "bfloat16", args.device, args.rank)
        jobs = {
            k: v
            for n in args.ranks
            for k, v in workloads(model, work, n, args.method, args.svd, args.device, args.rank).items()
        }
        results: dict[str, list[dict]] = {k: [] for k in jobs}
        outputs: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, argv in jobs.items():
                out = work / "runs" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                results[name].append(run(argv, out, work / "stats.json"))
                outputs[name] = digests(out)
                shutil.rmtree(out)
                print(f"{size} round {r + 1}: {name}: {results[name][-1]['seconds']:.2f} s", flush=True)
        lines += [
            f"## {size}",
            "",
            "| workload | median s | speed-up vs 1 rank | largest process peak RSS MiB | outputs as 1 rank's |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for name, v in results.items():
            first = name.rsplit(",", 1)[0] + f", {args.ranks[0]} rank(s)"
            med, base = (
                statistics.median(x["seconds"] for x in v),
                statistics.median(x["seconds"] for x in results[first]),
            )
            same = "byte-identical" if outputs[name] == outputs[first] else "DIFFERENT"
            rss = max(x["rss"] for x in v) / 2**20
            lines.append(f"| {name} | {med:.2f} | {base / med:.2f}× | {rss:.0f} | {same} |")
        lines.append("")
    write_report(args.out, "distributed", args.device, lines)


if __name__ == "__main__":
    main()
