"""decompose --method lora-da on BERT and RoBERTa end to end, and `--no-offset`, the LoRA-DA
authors' setting: the base stays as it is, the factors are the offset run's bit for bit, step 0 is base + s·B0·A0,
and train → convert → merge give the trained model on the original."""

import json

import pytest
import torch
from helpers import cli as run_cli
from helpers import train_args
from helpers.encoders import PARITY, cli, load_merged, outputs, sst2, texts
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from ailora_tools.manifests import base_of

CLS = ("--task", "sequence-classification")


def lora_da(src, out, data, *flags):
    cli(
        "decompose",
        src,
        "-o",
        out,
        "--method",
        "lora-da",
        "--data",
        data,
        *"--samples 16 --targets query,value --rank 4 --alpha 8 --quiet".split(),
        *flags,
    )
    return out


@pytest.mark.parametrize(
    "kind,task,auto",
    [
        ("bert-bare", "sequence-classification", AutoModelForSequenceClassification),
        ("roberta", "masked-lm", AutoModelForMaskedLM),
    ],
)
def test_lora_da_on_encoders_end_to_end_with_parity(encoder, tmp_path, kind, task, auto):
    src = encoder(kind)
    data = sst2(tmp_path / "d.jsonl", 24, seed=1) if task != "masked-lm" else texts(tmp_path / "d.jsonl", 24, seed=1)
    dec = lora_da(src, tmp_path / "dec", data, "--task", task)
    manifest = json.loads((dec / "ailora.json").read_text())
    assert manifest["data"]["task"] == task and manifest["adapter_base"] == "residual"
    assert all(m["gradient_norm"] > 0 for m in manifest["modules"].values())
    cli(
        *train_args(dec, data, tmp_path / "trained"),
        "--task",
        task,
        *"--lr 1e-2 --batch-size 8 --max-steps 3 --json".split(),
    )
    cli("convert", "--trained", tmp_path / "trained", "-o", tmp_path / "lora", "--json")
    cli("merge", src, tmp_path / "lora", "-o", tmp_path / "merged", "--json")
    expected = outputs(PeftModel.from_pretrained(auto.from_pretrained(dec / "residual"), tmp_path / "trained"), src)
    start = outputs(PeftModel.from_pretrained(auto.from_pretrained(dec / "residual"), dec / "adapter"), src)
    assert (
        outputs(PeftModel.from_pretrained(auto.from_pretrained(src), tmp_path / "lora"), src) - expected
    ).abs().max() <= PARITY
    assert (outputs(load_merged(auto, tmp_path / "merged"), src) - expected).abs().max() <= PARITY
    if task == "masked-lm":  # step 0 is the model (a classifier's new head is not in the original)
        assert (start - outputs(auto.from_pretrained(src), src)).abs().max() <= PARITY


def test_classification_calibration_cuts_long_text_as_train_does(encoder, tmp_path):
    """Classification text longer than --max-length is cut for the calibration as train cuts it (the label is not
    in the tokens), so a comparison at a short --max-length runs LoRA-DA too."""
    from ailora_tools.init.lora_da.method import calibration_samples
    from ailora_tools.io.checkpoint import Checkpoint
    from ailora_tools.options import TaskOptions

    src = encoder("bert-bare")
    data = sst2(tmp_path / "d.jsonl", 24, seed=1)
    task = TaskOptions(task="sequence-classification")
    _, full, _ = calibration_samples(Checkpoint.open(src), data, "sequence-classification", task, 16, 512, seed=0)
    _, cut, _ = calibration_samples(Checkpoint.open(src), data, "sequence-classification", task, 16, 3, seed=0)
    assert max(len(e.input_ids) for e in full) > 3 and all(len(e.input_ids) <= 3 for e in cut)
    assert [e.input_ids[:2] for e in cut] == [e.input_ids[:2] for e in full]  # the same start, then [SEP]
    lora_da(src, tmp_path / "dec", data, *CLS, "--max-length", "3")
    assert json.loads((tmp_path / "dec" / "ailora.json").read_text())["method"] == "lora-da"


def test_no_offset_keeps_the_base_same_factors_and_converts_to_the_trained_adapter(encoder, tmp_path):
    src = encoder("bert-cls")
    data = sst2(tmp_path / "d.jsonl", 24, seed=1, names=("negative", "positive"))
    offset = lora_da(src, tmp_path / "offset", data, *CLS)
    plain = lora_da(src, tmp_path / "plain", data, *CLS, "--no-offset")
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (offset, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the factors, bit for bit
    manifest = json.loads((plain / "ailora.json").read_text())
    assert manifest["no_offset"] is True and manifest["adapter_base"] == "original"
    assert not (plain / "residual").exists() and manifest["applies_to"]["kind"] == "original"
    assert base_of(plain / "adapter").kind == "original"
    auto = AutoModelForSequenceClassification
    cli("merge", src, plain / "adapter", "-o", tmp_path / "m0", "--json")  # the model at step 0
    step0 = outputs(load_merged(auto, tmp_path / "m0"), src)
    assert (step0 - outputs(auto.from_pretrained(src), src)).abs().max() > 1e-4  # base + s·B0·A0, not the base
    cli(
        "train",
        "--base",
        src,
        "--adapter",
        plain / "adapter",
        "--data",
        data,
        "-o",
        tmp_path / "trained",
        *CLS,
        *"--lr 1e-2 --batch-size 8 --max-steps 3 --json".split(),
    )
    assert json.loads((tmp_path / "trained" / "ailora-train.json").read_text())["mode"] == "no_offset"
    assert not base_of(tmp_path / "trained").offset  # the trained adapter alone is the change: merge and serve take it
    cli("convert", "--trained", tmp_path / "trained", "-o", tmp_path / "lora", "--json")
    for name, adapter in (("m1", tmp_path / "trained"), ("m2", tmp_path / "lora")):
        cli("merge", src, adapter, "-o", tmp_path / name, "--json")
    expected = outputs(PeftModel.from_pretrained(auto.from_pretrained(src), tmp_path / "trained"), src)
    assert (expected - step0).abs().max() > 1e-3  # training moved it
    got = {
        "original + converted": outputs(PeftModel.from_pretrained(auto.from_pretrained(src), tmp_path / "lora"), src),
        "merged original + trained": outputs(load_merged(auto, tmp_path / "m1"), src),
        "merged original + converted": outputs(load_merged(auto, tmp_path / "m2"), src),
    }
    for what, logits in got.items():
        assert (logits - expected).abs().max() <= PARITY, what
    converted = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert converted["r"] == 4  # the trained adapter itself: no −B0·A0 half


def test_no_offset_for_svd_methods_and_its_refusals(encoder, tmp_path):
    src = encoder("bert-cls")
    for flags in ((), ("--no-offset",)):
        cli(
            "decompose",
            src,
            "-o",
            tmp_path / f"p{len(flags)}",
            *"--method pissa --targets query,value --rank 4 --quiet".split(),
            *flags,
        )
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("p0", "p1"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "p1" / "residual").exists()
    for flags, message in (
        (("--no-offset", "--no-residual"), "--no-offset and --no-residual: "),
        (("--no-offset", "--residual-dtype", "float16"), "--residual-dtype: --no-offset writes no"),
    ):
        res = run_cli("decompose", src, "-o", tmp_path / "x", "--method", "pissa", "--targets", "query", *flags)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and message in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_get_ailora_model_no_offset_leaves_the_weights(encoder):
    from ailora_tools import get_ailora_model

    models = [AutoModelForSequenceClassification.from_pretrained(encoder("bert-cls")) for _ in range(2)]
    original = models[1].bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    offset, plain = (
        get_ailora_model(m, method="pissa", rank=4, targets=("query",), no_offset=n, progress=False)
        for m, n in zip(models, (False, True))
    )
    layer = lambda m: m.base_model.model.bert.encoder.layer[0].attention.self.query  # noqa: E731
    assert torch.equal(layer(plain).get_base_layer().weight, original)  # the base as it is
    assert not torch.equal(layer(offset).get_base_layer().weight, original)  # the residual
    assert torch.equal(layer(plain).lora_A["default"].weight, layer(offset).lora_A["default"].weight)
    assert torch.equal(layer(plain).lora_B["default"].weight, layer(offset).lora_B["default"].weight)
