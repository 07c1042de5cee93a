"""`verify` checks a train output's checkpoints (checkpoints/step-N/) as its manifest records them,
names a damaged file there, and says which checkpoints it checked and which were removed."""

import json
import shutil

import pytest
from helpers import cli, train_dec

from ailora_tools.decomposition import decompose
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.verify import verify

STEPS = ["checkpoints/step-0000002", "checkpoints/step-0000004"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama decomposed and trained 4 steps, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("verify")
    decompose(build_tiny_model(root / "src", seed=0), root / "dec", rank=4, progress=False)
    train_dec(root / "dec", data_file("demo_train.jsonl"), root / "trained", max_steps=4, batch_size=2, save_every=2)
    return root / "trained"


def test_a_finished_train_output_checks_its_checkpoints(trained):
    report = verify(trained)
    assert report["problems"] == [] and report["checkpoints_checked"] == STEPS
    files = json.loads((trained / "ailora-train.json").read_text())["files"]["checkpoints"]
    assert sorted(files) == sorted(
        f"{s}/{n}"
        for s in STEPS
        for n in ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json")
    )
    assert report["files_checked"] == len(files) + 2  # and the adapter's two files
    res = cli("verify", trained)
    assert res.exit_code == 0, res.output
    assert f"{trained}: ailora-train.json, 2 train checkpoints; 10 files" in res.output


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_damaged_file_in_a_checkpoint_is_named(trained, tmp_path, name):
    out = tmp_path / "t"
    shutil.copytree(trained, out)
    damaged = out / STEPS[0] / name
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0x01
    damaged.write_bytes(bytes(data))
    res = cli("verify", out)
    assert res.exit_code == 1, res.output
    assert f"problem: {STEPS[0]}/{name}: content differs from the manifest" in res.output, res.output
    assert res.output.count("problem:") == 1


def test_a_removed_checkpoint_is_a_note_and_an_unrecorded_one_is_said_to_be_unchecked(trained, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(trained, out)
    shutil.rmtree(out / STEPS[0])
    (out / STEPS[1] / "optimizer.safetensors").unlink()
    report = verify(out)
    assert report["notes"] == [f"{STEPS[0]}: removed, not checked"]
    assert report["problems"] == [f"{STEPS[1]}/optimizer.safetensors: missing"]
    manifest = json.loads((out / "ailora-train.json").read_text())
    del manifest["files"]["checkpoints"]  # as an older ailora-tools wrote it
    (out / "ailora-train.json").write_text(json.dumps(manifest))
    report = verify(out)
    assert report["problems"] == [] and report["checkpoints_checked"] == []
    assert report["notes"] == [
        "checkpoints/ not checked: the manifest records no digests for it (written by an older ailora-tools)"
    ]
