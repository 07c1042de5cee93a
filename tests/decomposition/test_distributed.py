"""decompose and merge launched by torchrun: two CPU processes (gloo) write what one process writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import build_model
from helpers.processes import ONE_THREAD, run_killed, torchrun, tree_hashes
from safetensors.torch import load_file, save_file

from ailora_tools.decomposition import plan
from ailora_tools.distributed import assign, work
from ailora_tools.init import get_method
from ailora_tools.io.checkpoint import Checkpoint

pytestmark = pytest.mark.slow  # torchrun launches: seconds each


def single(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ailora_tools.cli", *map(str, args)], capture_output=True, text=True, env=ONE_THREAD
    )


def same_outputs(a, b, manifest: str) -> None:
    """Every file byte-identical, less the paths that name the output directory itself."""
    ha, hb = tree_hashes(a), tree_hashes(b)
    ma, mb = (json.loads((d / manifest).read_text()) for d in (a, b))
    for m in (ma, mb):
        m["files"]["output"].pop("adapter/adapter_config.json", None)  # names its own residual directory
        m.get("summary", {}).pop("output", None)
    assert ma == mb
    bound = {manifest, "adapter/adapter_config.json"}
    assert {k: v for k, v in ha.items() if k not in bound} == {k: v for k, v in hb.items() if k not in bound}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("dist") / "m")


@pytest.mark.parametrize("args", [["--method", "ailora", "--svd", "exact"], ["--method", "pissa", "--no-residual"]])
def test_decompose_on_two_ranks_writes_what_one_process_writes(model, tmp_path, args):
    ran = torchrun("decompose", model, "-o", tmp_path / "two", "--rank", "4", "--json", *args)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)  # rank 0 alone reports; rank 1 prints nothing
    assert summary["modules"] == 4
    one = single("decompose", model, "-o", tmp_path / "one", "--rank", "4", "--quiet", *args)
    assert one.returncode == 0, one.stderr
    same_outputs(tmp_path / "one", tmp_path / "two", "ailora.json")


def test_resume_and_merge_on_two_ranks(model, tmp_path):
    args = ["--rank", "4", "--quiet"]
    killed = run_killed("decompose", model, "-o", tmp_path / "two", *args)  # one process, killed after a shard
    assert killed.returncode == -9 and not (tmp_path / "two" / "ailora.json").exists()
    ran = torchrun("decompose", model, "-o", tmp_path / "two", *args, "--resume")
    assert ran.returncode == 0, ran.stderr
    assert single("decompose", model, "-o", tmp_path / "one", *args).returncode == 0
    same_outputs(tmp_path / "one", tmp_path / "two", "ailora.json")
    assert single("verify", tmp_path / "two").returncode == 0

    ran = torchrun(
        "merge", tmp_path / "two" / "residual", tmp_path / "two" / "adapter", "-o", tmp_path / "m2", "--quiet"
    )
    assert ran.returncode == 0, ran.stderr
    one = single("merge", tmp_path / "one" / "residual", tmp_path / "one" / "adapter", "-o", tmp_path / "m1", "--quiet")
    assert one.returncode == 0, one.stderr
    ha, hb = tree_hashes(tmp_path / "m1"), tree_hashes(tmp_path / "m2")
    assert ha.pop("ailora-merge.json") and hb.pop("ailora-merge.json") and ha == hb
    merged = load_file(str(next((tmp_path / "m2").glob("*.safetensors"))))
    assert merged  # the merged model's tensors load


def test_a_failing_rank_stops_the_run_without_a_manifest(model, tmp_path):
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(model), str(bad)], check=True)
    jobs = plan(Checkpoint.open(bad), get_method("ailora"), ["q_proj", "v_proj"], {}, 4)
    owners = assign({j.tensor.name: work(j.tensor.shape) for j in jobs}, 2)
    job = next(j for j in jobs if owners[j.tensor.name] == 1)  # rank 1's first matrix
    name, shard = job.tensor.name, bad / job.tensor.file
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ran = torchrun("decompose", bad, "-o", tmp_path / "out", "--rank", "4", "--quiet")
    assert ran.returncode != 0
    assert f"error: rank 1: {job.tensor.file}: tensor {name!r} holds NaN" in ran.stderr, ran.stderr  # from rank 0
    assert not (tmp_path / "out" / "ailora.json").exists()


def test_bad_input_stops_every_rank_before_anything_is_written(model, tmp_path):
    ran = torchrun("decompose", model, "-o", tmp_path / "out", "--rank", "4000")
    assert ran.returncode != 0
    assert "error: --rank 4000: " in ran.stderr  # the first rank to fail says it (torchrun then stops the other)
    assert not (tmp_path / "out").exists()
