"""vLLM's servable LoRA modules per architecture, as vLLM 0.32 declares them (`rules.SERVABLE_MODULES`): a Phi-3 LoRA
on its fused `qkv_proj` / `gate_up_proj` is served, a GPT-2 one refused naming why; the recorded table is what the
installed vLLM declares (serve marker: it needs the vLLM environment)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import DECODER, cli
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

from ailora_tools import check_adapter, convert
from ailora_tools.adapters.rules import SERVABLE_MODULES, VLLM_READ, VLLM_TABLE_VERSION
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.servers.vllm import find_python

ROOT = Path(__file__).resolve().parents[2]


def peft_lora(model, base: Path, out: Path, targets: list[str]) -> Path:
    """A PEFT LoRA (B moved off zero, as training would) on `model` saved at `base`."""
    model.save_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    return out


def test_phi3_lora_on_fused_projections_passes_check_and_convert_for_vllm(tmp_path):
    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(**DECODER, pad_token_id=0))
    lora = peft_lora(phi3, tmp_path / "phi3", tmp_path / "lora", ["qkv_proj", "gate_up_proj"])
    assert check_adapter(lora, target="vllm") == []
    res = cli("check", lora, "--for", "vllm")
    assert res.exit_code == 0 and "passes for vllm" in res.output, res.output
    summary = convert(lora, tmp_path / "served", server="vllm")
    assert summary["check"] == [] and summary["rank"] == 8  # 4 padded to vLLM's next rank
    written, source = read_adapter(tmp_path / "served"), read_adapter(lora)
    assert {m.rsplit(".", 1)[-1] for m in written.factors} == {"qkv_proj", "gate_up_proj"}
    for m in source.factors:
        torch.testing.assert_close(written.delta(m), source.delta(m), atol=1e-6, rtol=0)


def test_gpt2_lora_is_refused_naming_why(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    lora = peft_lora(gpt2, tmp_path / "gpt2", tmp_path / "lora", ["c_attn"])
    found = check_adapter(lora, target="vllm")
    assert [f.rule for f in found] == ["architecture"]
    assert "GPT2LMHeadModel (gpt2) does not declare SupportsLoRA" in str(found[0]), found
    assert f"vLLM {VLLM_TABLE_VERSION}" in str(found[0]) and "ailora-tools merge" in found[0].fix
    res = cli("convert", "--trained", lora, "-o", tmp_path / "served", "--for", "vllm")
    assert res.exit_code == 1 and "does not declare SupportsLoRA" in res.output, res.output
    assert not (tmp_path / "served").exists()


def test_a_module_vllm_does_not_serve_on_that_architecture_is_named(tmp_path):
    """A Llama-style name on Phi-3 (whose q/k/v are one packed layer vLLM does not split) is refused."""
    assert "q_proj" not in SERVABLE_MODULES["vllm"]["phi3"] and "qkv_proj" in SERVABLE_MODULES["vllm"]["phi3"]
    assert {"q_proj", "v_proj"} <= SERVABLE_MODULES["vllm"]["llama"] and "qkv_proj" not in SERVABLE_MODULES["vllm"][
        "llama"
    ]


@pytest.mark.serve
def test_the_recorded_table_is_what_the_installed_vllm_declares():
    python = find_python()
    done = subprocess.run(
        [python, str(ROOT / ".ci" / "vllm_lora_modules.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    read = json.loads(done.stdout)
    assert read["vllm"].split("+")[0] == VLLM_TABLE_VERSION
    assert {t: (r["class"], tuple(r["modules"])) for t, r in read["models"].items()} == VLLM_READ
