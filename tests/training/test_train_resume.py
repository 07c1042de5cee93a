"""`train --resume` as a scheduler that always passes it wants: with nothing to resume it starts a
fresh run and says so; a run that finished with the same settings is left as it is (exit 0, "complete, nothing to
do"); a damaged checkpoint is named before anything loads from it."""

import json
import shutil

import pytest
from helpers import cli, killed_at_update, one_line_error

from ailora_tools.console import one_line_warnings
from ailora_tools.decomposition import decompose
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import FormatError
from ailora_tools.training import train

OPTS = {"max_steps": 4, "batch_size": 2, "save_every": 2, "lr": 1e-2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama decomposed and trained 4 steps (checkpoints at steps 2 and 4), and the command line that did it."""
    root = tmp_path_factory.mktemp("resume")
    decompose(build_tiny_model(root / "src", seed=0), root / "dec", rank=4, progress=False)
    args = [root / "dec" / "residual", root / "dec" / "adapter", data_file("demo_train.jsonl")]
    train(*args, root / "trained", progress=False, **OPTS)
    flags = [
        "--base",
        args[0],
        "--adapter",
        args[1],
        "--data",
        args[2],
        *"--max-steps 4 --batch-size 2 --save-every 2 --lr 0.01 --quiet".split(),
    ]
    return {"args": args, "flags": flags, "trained": root / "trained"}


def _files(root) -> dict:
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_is_a_no_op_that_succeeds(run, tmp_path):
    one_line_warnings()  # as the command line prints them (pytest records warnings in each test)
    shutil.copytree(run["trained"], tmp_path / "t")
    before = _files(tmp_path / "t")
    res = cli("train", *run["flags"], "-o", tmp_path / "t", "--resume")
    assert res.exit_code == 0, res.output
    assert f"warning: --resume: the run in {tmp_path / 't'} is complete, nothing to do" in res.output
    assert "complete, nothing to do" in res.output.split("\n", 2)[2]  # the summary's "resume" row
    assert _files(tmp_path / "t") == before
    recorded = json.loads((tmp_path / "t" / "ailora-train.json").read_text())["summary"]
    summary = train(*run["args"], tmp_path / "t", progress=False, resume=True, **OPTS)
    assert summary["resume"] == "complete, nothing to do"
    assert {k: summary[k] for k in recorded} == recorded
    assert _files(tmp_path / "t") == before


def test_resume_of_a_finished_run_with_other_settings_is_refused(run, tmp_path):
    shutil.copytree(run["trained"], tmp_path / "t")
    before = _files(tmp_path / "t")
    flags = [f if f != "4" else "6" for f in run["flags"]]
    one_line_error(
        cli("train", *flags, "-o", tmp_path / "t", "--resume"),
        "(complete: ailora-train.json is written)",
        "used other settings (steps)",
        "--overwrite",
    )
    assert _files(tmp_path / "t") == before


def test_resume_into_a_missing_directory_starts_a_fresh_run_and_says_so(run, tmp_path):
    one_line_warnings()
    res = cli("train", *run["flags"], "-o", tmp_path / "new", "--resume")
    assert res.exit_code == 0, res.output
    assert (
        f"warning: --resume: nothing to resume in {tmp_path / 'new'} (no checkpoint there): starting a fresh run\n"
    ) in res.output
    assert json.loads((tmp_path / "new" / "ailora-train.json").read_text())["summary"]["steps"] == 4


def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes(run, tmp_path, monkeypatch):
    opts = {**OPTS, "save_every": 1}
    with killed_at_update(monkeypatch, 4):  # killed after step 3: checkpoints 1, 2, 3
        train(*run["args"], tmp_path / "t", progress=False, **opts)
    latest = tmp_path / "t" / "checkpoints" / "step-0000003"
    data = bytearray((latest / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (latest / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        FormatError,
        match=rf"{latest / 'optimizer.safetensors'}: missing or not as trainer_state.json "
        rf"recorded it \(damaged\); delete {latest} to resume from the checkpoint",
    ):
        train(*run["args"], tmp_path / "t", progress=False, resume=True, **opts)
    shutil.rmtree(latest)  # as told
    summary = train(*run["args"], tmp_path / "t", progress=False, resume=True, **opts)
    straight = json.loads((run["trained"] / "ailora-train.json").read_text())["summary"]
    assert summary["steps"] == 4 and summary["last_loss"] == pytest.approx(straight["last_loss"], rel=1e-5)
