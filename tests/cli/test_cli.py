"""The CLI: Hub ids through the local cache (offline), --json, one-line errors with exit codes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ailora_tools.cli import main


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "ailora_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def hub_cache(src: Path, cache: Path, repo="acme/tiny-llama", commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay a model out as huggingface_hub's cache does: models--ORG--NAME/snapshots/<commit>, refs/main."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo


@pytest.mark.slow
def test_hub_id_from_offline_cache(tiny, tmp_path):
    repo = hub_cache(Path(tiny("llama")), tmp_path / "hub")
    res = run_cli(
        "decompose",
        repo,
        "-o",
        tmp_path / "out",
        "--rank",
        "4",
        "--json",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["source"]["model"] == repo and summary["modules"] == 4
    assert (tmp_path / "out" / "residual" / "model.safetensors.index.json").is_file()
    missing = run_cli(
        "decompose",
        "acme/absent",
        "-o",
        tmp_path / "out2",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert missing.returncode == 1
    assert "acme/absent: not found on the Hub or in the local cache" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "out2").exists()


def test_errors_are_one_line_with_nonzero_exit(tiny, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["decompose", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "nope: no such directory" in res.output
    res = runner.invoke(main, ["decompose", str(tiny("llama")), "-o", str(tmp_path / "o"), "--rank", "64"])
    assert res.exit_code == 1 and "--rank 64" in res.output and "so rank must be below" in res.output
    res = runner.invoke(main, ["decompose", str(tiny("llama")), "-o", str(tmp_path / "o"), "--role", "k_proj"])
    assert res.exit_code == 1 and "expected NAME=principal|minor" in res.output and res.output.count("\n") == 1
    res = runner.invoke(main, ["--debug", "decompose", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.exception is not None  # --debug re-raises for a traceback


def test_openmp_threads_sleep_when_idle_only_in_the_streaming_commands(tmp_path, monkeypatch):
    # decompose and merge alternate SVDs with I/O threads: idle OpenMP threads must not spin there; training's many
    # small ops would pay a wake-up each, so train (and compare, demo) keep OpenMP's default
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    CliRunner().invoke(
        main,
        [
            "train",
            "--base",
            str(tmp_path / "nope"),
            "--adapter",
            str(tmp_path / "a"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "-o",
            str(tmp_path / "t"),
        ],
    )
    assert "OMP_WAIT_POLICY" not in os.environ
    CliRunner().invoke(main, ["decompose", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's setting wins
    CliRunner().invoke(main, ["merge", str(tmp_path / "nope"), str(tmp_path / "a"), "-o", str(tmp_path / "m")])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_summary_and_progress(tiny, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "decompose",
            str(tiny("qwen2")),
            "-o",
            str(tmp_path / "o"),
            *"--rank 4 --method pissa --svd exact".split(),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "decomposed 4 modules" in res.output and "worst_recon_rel_fro" in res.output
