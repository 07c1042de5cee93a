"""Smoke tests: each benchmark script runs at a tiny size and writes its table (no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.slow
def test_bench_decompose_runs_every_workload(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_decompose.py"), "--sizes", "tiny", "--rounds", "1",
                    "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results")],
                   check=True, capture_output=True, text=True)
    (report,) = (tmp_path / "results").glob("decompose-cpu-*.md")
    text = report.read_text()
    for workload in ("copy (cp -r)", "decompose pissa randomized", "decompose pissa exact", "decompose ailora randomized",
                     "PEFT pissa (full SVD)", "PEFT pissa_niter_4", "merge (residual + trained)", "convert (trained -> LoRA)"):
        assert f"| {workload} |" in text
    assert "Targets (set for the 1.1B checkpoint; shown for reference):" in text and "peak RSS ≤ 1/4 of PEFT's" in text and "Command: `python benchmarks/bench_decompose.py" in text


def test_bench_svd_runs_every_method(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_svd.py"), "--sizes", "96", "--repeats", "1",
                    "--devices", "cpu", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    (report,) = tmp_path.glob("svd-cpu-*.md")
    rows = [line for line in report.read_text().splitlines() if line.startswith("| cpu | 96 |")]
    assert len(rows) == 10  # 6 methods, principal and minor where they apply
    errors = {r.split("|")[4].strip() + " " + r.split("|")[3].strip(): float(r.split("|")[6]) for r in rows}
    assert errors["ailora-tools exact minor"] < 1e-6 and errors["ailora-tools exact principal"] < 1e-6


@pytest.mark.slow
def test_bench_calibration_runs_engine_and_reference(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_calibration.py"), "--sizes", "tiny", "--samples", "2",
                    "--tokens", "16", "--batch-sizes", "2", "--workdir", str(tmp_path / "work"),
                    "--out", str(tmp_path / "results")], check=True, capture_output=True, text=True)
    (report,) = (tmp_path / "results").glob("calibration-cpu-*.md")
    rows = {r.split("|")[1].strip(): r for r in report.read_text().splitlines() if r.startswith("| ")}
    assert "whole model + hooks (reference)" in rows and "layer-wise engine, batch 2" in rows
    g_diff, z_diff = (float(v) for v in rows["layer-wise engine, batch 2"].split("|")[7].split("/"))
    assert g_diff < 0.05 and z_diff < 1e-3  # bfloat16 compute on both sides
