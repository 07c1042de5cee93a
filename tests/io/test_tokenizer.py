"""Tokenizers as users have them: sentencepiece-only, none in the base (--tokenizer), no pad token."""

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import spm_tokenizer

from ailora_tools import decompose
from ailora_tools.demo import data_file
from ailora_tools.errors import InputNotFoundError, UnsupportedError
from ailora_tools.io.examples import collate, load_jsonl
from ailora_tools.io.tokenizer import load_tokenizer
from ailora_tools.training.trainer import train


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory holding only a sentencepiece `tokenizer.model` (as older Llama/Mistral checkpoints ship)."""
    root = tmp_path_factory.mktemp("spm")
    spm_tokenizer(root, vocab_size=60)
    (root / "tok").mkdir()
    shutil.copy(root / "tokenizer.model", root / "tok" / "tokenizer.model")
    return root / "tok"


@pytest.fixture(scope="module")
def plain_base(tiny, tmp_path_factory):
    """The tiny Llama without tokenizer files, decomposed without a residual (trains on the base itself)."""
    root = tmp_path_factory.mktemp("notok")
    decompose(tiny("llama"), root / "dec", rank=4, no_residual=True, progress=False)
    return root


def test_the_project_installs_what_sentencepiece_tokenizers_need():
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert {"sentencepiece", "protobuf"} <= names


def test_sentencepiece_only_tokenizer_loads_and_pads_with_eos(spm_dir):
    tok, pad = load_tokenizer(spm_dir)
    assert tok.pad_token_id is None and pad == tok.eos_token_id == 2
    assert tok.decode(tok("Q: 1 + 2 = ?", add_special_tokens=False)["input_ids"]) == "Q: 1 + 2 = ?"


def test_missing_sentencepiece_packages_name_what_to_install(spm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # as if protobuf were not installed
    with pytest.raises(
        UnsupportedError,
        match=r"--base .*sentencepiece model.*missing here: protobuf; run "
        r"`pip install sentencepiece protobuf`",
    ):
        load_tokenizer(spm_dir, flag="--base")


def test_train_with_tokenizer_flag_on_a_base_without_tokenizer(tiny, plain_base, spm_dir, tmp_path):
    args = (tiny("llama"), plain_base / "dec" / "adapter", data_file("demo_train.jsonl"))
    with pytest.raises(InputNotFoundError, match=r"--base .*: no tokenizer files .*--tokenizer DIR_OR_HUB_ID"):
        train(*args, tmp_path / "a", max_steps=1, progress=False)
    s = train(*args, tmp_path / "b", tokenizer=spm_dir, max_steps=4, lr=1e-2, batch_size=8, progress=False)
    assert s["steps"] == 4 and s["last_loss"] < s["first_loss"]
    assert json.loads((tmp_path / "b" / "ailora-train.json").read_text())["tokenizer"] == str(spm_dir)


def test_sentencepiece_only_base_trains_without_the_flag(tiny, plain_base, spm_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny("llama"), base)
    shutil.copy(spm_dir / "tokenizer.model", base / "tokenizer.model")
    s = train(
        base,
        plain_base / "dec" / "adapter",
        data_file("demo_train.jsonl"),
        tmp_path / "t",
        max_steps=2,
        batch_size=8,
        progress=False,
        adapter_base="original",
    )
    assert s["steps"] == 2


def test_unknown_hub_tokenizer_is_one_clear_error(tiny, plain_base, tmp_path):
    with pytest.raises(InputNotFoundError, match=r"--tokenizer no-such-org/no-such-tokenizer: cannot load a tokenizer"):
        train(
            tiny("llama"),
            plain_base / "dec" / "adapter",
            data_file("demo_train.jsonl"),
            tmp_path / "t",
            tokenizer="no-such-org/no-such-tokenizer",
            max_steps=1,
            progress=False,
        )


def test_no_pad_token_pads_with_eos_and_padding_changes_nothing(tiny, spm_dir):
    """Most Llama tokenizers have no pad token: the batch pads with eos, which is masked out entirely."""
    from transformers import AutoModelForCausalLM

    tok, pad = load_tokenizer(spm_dir)
    examples = load_jsonl(data_file("demo_eval.jsonl"), tok, max_length=64)[:6]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch needs padding
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        with_eos = model(**collate(examples, pad)).loss
        with_other = model(**collate(examples, 7)).loss
        alone = [model(**collate([e], pad)).loss * (sum(x != -100 for x in e.labels[1:])) for e in examples]
    torch.testing.assert_close(with_eos, with_other)
    n = sum(sum(x != -100 for x in e.labels[1:]) for e in examples)
    torch.testing.assert_close(with_eos, sum(alone) / n, rtol=1e-5, atol=1e-6)
