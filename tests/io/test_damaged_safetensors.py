"""A damaged safetensors file the tool reads (an adapter, a residual shard, trained biases,
optimizer state) is named, with the tensor and the byte counts where the header says them, and what to do."""

import re

import pytest
import torch
from helpers import build_model, cli, one_line_error
from safetensors.torch import save_file

from ailora_tools.decomposition import decompose
from ailora_tools.errors import FormatError, InputNotFoundError
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.peft_adapter import WEIGHTS_NAME, read_adapter
from ailora_tools.io.tensorio import REDO, load_tensors
from ailora_tools.training.bitfit import WEIGHTS_NAME as BITFIT_WEIGHTS
from ailora_tools.training.bitfit import read_bitfit

TRUNCATED = r"tensor '[^']+' ends at byte \d+ of a \d+-byte data buffer: the file is truncated \(\d+ bytes missing\)"


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    decompose(build_model("llama", root / "src"), root / "dec", rank=4, progress=False)
    return root / "dec"


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if how == "truncated" else b"")


@pytest.mark.parametrize("how", ["truncated", "zero-byte"])
@pytest.mark.parametrize("command", ["merge", "convert"])
def test_a_damaged_adapter_is_named_and_nothing_is_written(decomposed, tmp_path, command, how):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in (decomposed / "adapter").iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    _damage(adapter / WEIGHTS_NAME, how)
    args = (
        ["merge", decomposed / "residual", adapter]
        if command == "merge"
        else ["convert", "--trained", adapter, "--initial", decomposed / "adapter"]
    )
    res = cli(*args, "-o", tmp_path / "out")
    one_line_error(res, f"{adapter / WEIGHTS_NAME}: ", REDO)
    assert re.search(TRUNCATED if how == "truncated" else r"not a safetensors file \(only 0 bytes", res.output)
    assert not (tmp_path / "out").exists()


def test_a_truncated_residual_shard_is_named_with_its_tensor_and_bytes(decomposed, tmp_path):
    residual = tmp_path / "residual"
    residual.mkdir()
    for f in (decomposed / "residual").iterdir():
        (residual / f.name).write_bytes(f.read_bytes())
    shard = sorted(residual.glob("*.safetensors"))[-1]
    _damage(shard, "truncated")
    with pytest.raises(FormatError, match=rf"{re.escape(str(shard))}: {TRUNCATED}; {re.escape(REDO)}"):
        Checkpoint.open(residual)
    with pytest.raises(FormatError, match=rf"{re.escape(str(shard))}: {TRUNCATED}"):
        load_tensors(shard)


def test_truncated_trained_biases_are_named_with_their_tensor_and_bytes(tmp_path):
    save_file(
        {"model.layers.0.self_attn.q_proj.bias": torch.randn(64), "score.weight": torch.randn(2, 64)},
        str(tmp_path / BITFIT_WEIGHTS),
        metadata={"format": "pt", "bitfit": "true"},
    )
    assert set(read_bitfit(tmp_path).extra) == {"model.layers.0.self_attn.q_proj.bias", "score.weight"}
    _damage(tmp_path / BITFIT_WEIGHTS, "truncated")
    with pytest.raises(FormatError, match=rf"{re.escape(str(tmp_path / BITFIT_WEIGHTS))}: {TRUNCATED}"):
        read_bitfit(tmp_path)


def test_the_opener_reads_what_safetensors_wrote_and_refuses_what_is_not_there(decomposed, tmp_path):
    from safetensors.torch import load_file

    path = decomposed / "adapter" / WEIGHTS_NAME
    ours, theirs = load_tensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert read_adapter(decomposed / "adapter").factors.keys()
    with pytest.raises(InputNotFoundError, match=r"gone\.safetensors: no such file"):
        load_tensors(tmp_path / "gone.safetensors")
    (tmp_path / "header.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        FormatError,
        match=r"header length 1000000 runs past the file \(10 bytes, at least 1000008 "
        r"needed\): the file is truncated or corrupt",
    ):
        load_tensors(tmp_path / "header.safetensors")
