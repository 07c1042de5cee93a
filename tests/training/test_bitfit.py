"""BitFit: `train --bitfit` trains only bias terms (and a classification head), `merge` writes
them into the model; a model without bias terms (Llama) is refused in one line."""

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import compare_briefly, killed_at_update
from helpers.encoders import build_encoder, sst2
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ailora_tools import compare, merge
from ailora_tools.adapters.check import check_adapter
from ailora_tools.cli import main
from ailora_tools.demo import data_file
from ailora_tools.errors import OptionError, UnsupportedError
from ailora_tools.manifests import BITFIT_MANIFEST
from ailora_tools.training.bitfit import WEIGHTS_NAME, load_bitfit
from ailora_tools.training.trainer import train
from ailora_tools.verify import verify

#: merged model against the model as trained (base + trained biases), on logits
PARITY = 1e-5


def probe(model) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(input_ids=torch.randint(4, 90, (2, 12))).logits


def test_bitfit_trains_only_biases_and_merge_gives_the_trained_logits(models, tmp_path):
    base = models["qwen2"]
    s = train(
        base,
        None,
        data_file("demo_train.jsonl"),
        tmp_path / "bf",
        eval_data=data_file("demo_eval.jsonl"),
        bitfit=True,
        max_steps=8,
        lr=2e-2,
        batch_size=8,
        progress=False,
    )
    assert s["eval_loss"] < s["eval_loss_start"]
    with safe_open(str(tmp_path / "bf" / WEIGHTS_NAME), framework="pt") as f:
        names = sorted(f.keys())
    assert names == sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv")
    assert s["trainable_parameters"] == 2 * (64 + 32 + 32)  # q 4 heads x 16, k and v 2 heads x 16
    manifest = json.loads((tmp_path / "bf" / BITFIT_MANIFEST).read_text())
    assert manifest["mode"] == "bitfit" and manifest["initial_adapter"] is None
    assert not (tmp_path / "bf" / "ailora-train.json").exists() and verify(tmp_path / "bf")["problems"] == []

    trained = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = probe(trained)
    load_bitfit(trained, tmp_path / "bf")
    expected = probe(trained)
    assert (expected - before).abs().max() > 1e-3  # the biases changed the model

    res = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "bf"), "-o", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (probe(merged) - expected).abs().max() <= PARITY
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    for name, w in merged.state_dict().items():  # only the bias terms differ
        assert torch.equal(w, original[name]) == (name not in names), name


def test_bitfit_trains_a_new_classification_head_and_merges_it(tmp_path):
    src = build_encoder("bert-bare", tmp_path / "bert")
    data = sst2(tmp_path / "train.jsonl", 48, seed=0)
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--bitfit",
            "--base",
            str(src),
            "--data",
            str(data),
            "-o",
            str(tmp_path / "bf"),
            *"--task sequence-classification --lr 1e-2 --batch-size 8 --max-steps 6 --json --quiet".split(),
        ],
    )
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "bf" / WEIGHTS_NAME), framework="pt") as f:
        names = set(f.keys())
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.endswith(".bias") for n in names - {"classifier.weight"})
    assert "bert.encoder.layer.0.attention.self.query.bias" in names  # named as the task's class names them
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in names

    trained = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2, dtype=torch.float32)
    load_bitfit(trained, tmp_path / "bf")
    enc = {
        "input_ids": torch.tensor([[2, 7, 9, 3], [2, 11, 3, 0]]),
        "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]]),
    }
    with torch.no_grad():
        expected = trained.eval()(**enc).logits
    merge(src, tmp_path / "bf", tmp_path / "m", progress=False)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert (merged.eval()(**enc).logits - expected).abs().max() <= PARITY


def test_a_model_without_biases_is_one_line_and_exit_1(models, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--bitfit",
            "--base",
            str(models["llama"]),
            "--data",
            str(data_file("demo_train.jsonl")),
            "-o",
            str(tmp_path / "bf"),
        ],
    )
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("error: --bitfit:")
    assert "has no bias terms" in res.output and "Llama" in res.output
    assert not (tmp_path / "bf" / BITFIT_MANIFEST).exists()


def test_bitfit_options_are_checked(models, tmp_path):
    data = data_file("demo_train.jsonl")
    with pytest.raises(OptionError, match="--adapter is missing"):
        train(models["qwen2"], None, data, tmp_path / "a", progress=False)
    with pytest.raises(OptionError, match="takes no --adapter"):
        train(models["qwen2"], models["qwen2"], data, tmp_path / "b", bitfit=True, progress=False)
    with pytest.raises(OptionError, match="--progressive"):
        train(models["qwen2"], None, data, tmp_path / "c", bitfit=True, progressive=2, progress=False)
    with pytest.raises(UnsupportedError, match="no bias terms"):
        train(models["llama"], None, data, tmp_path / "d", bitfit=True, progress=False)


def test_bitfit_resume_continues_as_if_uninterrupted(models, tmp_path, monkeypatch):
    opts = {"bitfit": True, "max_steps": 6, "lr": 2e-2, "batch_size": 8, "save_every": 2, "progress": False}
    data = data_file("demo_train.jsonl")
    train(models["qwen2"], None, data, tmp_path / "straight", **opts)
    with killed_at_update(monkeypatch, 5):
        train(models["qwen2"], None, data, tmp_path / "cut", **opts)
    train(models["qwen2"], None, data, tmp_path / "cut", resume=True, **opts)
    with (
        safe_open(str(tmp_path / "straight" / WEIGHTS_NAME), framework="pt") as a,
        safe_open(str(tmp_path / "cut" / WEIGHTS_NAME), framework="pt") as b,
    ):
        for k in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), atol=1e-6, rtol=0)


def test_bitfit_output_is_not_served_as_a_lora(models, tmp_path):
    train(
        models["qwen2"], None, data_file("demo_train.jsonl"), tmp_path / "bf", bitfit=True, max_steps=1, progress=False
    )
    found = check_adapter(tmp_path / "bf", target="vllm")
    assert [f.rule for f in found] == ["bitfit"] and "ailora-tools merge" in found[0].fix
    res = CliRunner().invoke(
        main, ["convert", "--trained", str(tmp_path / "bf"), "--for", "vllm", "-o", str(tmp_path / "lora")]
    )
    assert res.exit_code == 1 and "ailora-tools merge" in res.output and not (tmp_path / "lora").exists()


def test_compare_runs_bitfit_without_decompose(models, tmp_path):
    summary = compare_briefly(
        models["qwen2"], data_file("demo_train.jsonl"), tmp_path / "cmp", ["lora", "bitfit"], max_steps=3
    )
    runs = {r["run"]: r for r in summary["runs"]}
    assert sorted(runs) == ["bitfit", "lora"] and runs["bitfit"]["decompose_seconds"] == 0.0
    assert not (tmp_path / "cmp" / "bitfit" / "decomposed").exists()
    assert (tmp_path / "cmp" / "bitfit" / "trained" / BITFIT_MANIFEST).is_file()
    assert runs["bitfit"]["trainable_parameters"] == 2 * (64 + 32 + 32) and runs["bitfit"]["steps"] == 3
    with pytest.raises(UnsupportedError, match="no bias terms"):
        compare(models["llama"], data_file("demo_train.jsonl"), tmp_path / "c2", methods=["bitfit"], progress=False)


def test_bitfit_output_merged_into_another_model_is_refused(models, tmp_path):
    """Trained biases belong to the model they were trained in: another Qwen2 of the same shapes is refused."""
    other = tmp_path / "other"
    torch.manual_seed(1)
    config = Qwen2Config.from_pretrained(models["qwen2"])
    Qwen2ForCausalLM(config).save_pretrained(other, max_shard_size="100KB")
    train(
        models["qwen2"], None, data_file("demo_train.jsonl"), tmp_path / "bf", bitfit=True, max_steps=1, progress=False
    )
    res = CliRunner().invoke(main, ["merge", str(other), str(tmp_path / "bf"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and str(other) in res.output and not (tmp_path / "m").exists(), res.output
    res = CliRunner().invoke(main, ["merge", str(models["qwen2"]), str(tmp_path / "bf"), "-o", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
