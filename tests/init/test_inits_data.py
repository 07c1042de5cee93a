"""decompose --method corda / lora-ga end to end (decompose → train → convert → merge: trained = converted = merged),
DoRA, as `compare` rows, a PEFT-made corda / lora_ga adapter trained by PEFT and converted with --initial, and bad
calibration input refused in one line before anything is written."""

import json

import pytest
import torch
from helpers import cli, compare_briefly, lm_logits, train_dec
from helpers.calibration import samples
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ailora_tools.adapters.conversion import convert
from ailora_tools.adapters.merging import merge
from ailora_tools.decomposition import decompose
from ailora_tools.demo import data_file
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.testing.peft_data_inits import peft_init

DATA = data_file("demo_train.jsonl")
PARITY = 1e-4


@pytest.mark.parametrize("method,extra", [("corda", {}), ("lora-ga", {}), ("corda", {"dora": True})])
def test_decompose_train_convert_merge_parity(llama, tmp_path, method, extra):
    s = decompose(
        llama,
        tmp_path / "d",
        method=method,
        rank=4,
        data=DATA,
        samples=8,
        max_length=64,
        progress=False,
        targets=("q_proj", "v_proj", "down_proj"),
        **extra,
    )
    manifest = json.loads((tmp_path / "d" / "ailora.json").read_text())
    assert manifest["method"] == method and manifest["adapter_base"] == "residual" and manifest["data"]["samples"] == 8
    assert s["worst_recon_rel_fro"] < 1e-6  # residual + initial adapter = the original model
    start = lm_logits(tmp_path / "d" / "residual", tmp_path / "d" / "adapter")
    assert (start - lm_logits(llama)).abs().max() < PARITY
    train_dec(tmp_path / "d", DATA, tmp_path / "t", max_steps=3, lr=1e-2, batch_size=8)
    trained = lm_logits(tmp_path / "d" / "residual", tmp_path / "t")
    assert (trained - start).abs().max() > 1e-3  # training moved the model
    if extra.get("dora"):  # DoRA: step 0 above; served merged (a LoRA on the original is convert --dora's)
        merge(tmp_path / "d" / "residual", tmp_path / "t", tmp_path / "m", progress=False)
        assert (trained - lm_logits(tmp_path / "m")).abs().max() < PARITY
        return
    convert(tmp_path / "t", tmp_path / "l")
    merge(llama, tmp_path / "l", tmp_path / "m", progress=False)
    assert (trained - lm_logits(llama, tmp_path / "l")).abs().max() < PARITY
    assert (trained - lm_logits(tmp_path / "m")).abs().max() < PARITY
    assert read_adapter(tmp_path / "l").config["r"] == 8  # rank 2r on the original


def test_compare_rows(llama, tmp_path):
    s = compare_briefly(llama, DATA, tmp_path / "c", ["corda", "lora-ga"])
    assert [r["run"] for r in s["runs"]] == ["corda", "lora-ga"]
    for m in ("corda", "lora-ga"):
        assert json.loads((tmp_path / "c" / m / "decomposed" / "ailora.json").read_text())["method"] == m
        assert f"| {m} |" in (tmp_path / "c" / "compare.md").read_text()


@pytest.mark.parametrize("method", ["corda", "lora_ga"])
def test_peft_made_adapter_converts_with_initial(llama, tmp_path, method):
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    rows = samples(llama, DATA, "causal-lm")[:8]
    peft, config = peft_init(model, method, rows, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    peft.save_pretrained(tmp_path / "init")
    assert read_adapter(tmp_path / "init").config["init_lora_weights"] == method
    optim = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    for ids, labels in rows:  # PEFT's training, by hand
        peft(input_ids=ids, labels=labels).loss.backward()
        optim.step()
        optim.zero_grad()
    peft.save_pretrained(tmp_path / "trained")
    res = cli(
        "convert",
        "--trained",
        tmp_path / "trained",
        "--initial",
        tmp_path / "init",
        "-o",
        tmp_path / "l",
        "--for",
        "vllm",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert read_adapter(tmp_path / "l").config["init_lora_weights"] is True  # what vLLM accepts
    peft.eval()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        trained = peft(input_ids=ids).logits
        converted = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), tmp_path / "l")
            .eval()(input_ids=ids)
            .logits
        )
    assert (trained - converted).abs().max() < PARITY


def test_bad_calibration_input_is_one_line(llama, tmp_path):
    def refused(method, *args, needle):
        res = cli("decompose", llama, "-o", tmp_path / "o", "--method", method, *args)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and needle in res.output, res.output
        assert not (tmp_path / "o").exists()

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    for method in ("corda", "lora-ga"):
        refused(method, needle="needs calibration samples; pass --data")
        refused(method, "--data", tmp_path / "empty.jsonl", needle="no examples")
        refused(method, "--data", tmp_path / "bad.jsonl", needle="bad.jsonl:2")
        refused(method, "--data", DATA, "--samples", "100000", needle="fewer than --samples 100000")
        refused(method, "--data", DATA, "--samples", "4", "--max-length", "5", needle="more than --max-length 5")
    refused("lora-ga", "--data", DATA, "--rank", "32", needle="lora-ga takes 2r = 64 singular directions")
    refused("pissa", "--data", DATA, needle="only lora-da, corda, lora-ga, eva do")
