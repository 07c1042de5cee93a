"""Serving what was trained on an NF4-quantised residual: the base re-quantised for vLLM (compressed-tensors W4A16)
and llama.cpp (GGUF Q4_0/Q8_0), convert and merge, each with its error against dequant(Q) + s·B·A measured."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file, save_file
from test_convert_merge import fake_training
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ailora_tools import convert, decompose, merge
from ailora_tools.demo import data_file
from ailora_tools.adapters.nf4_residual import read_dequantized
from ailora_tools.adapters.server_base import export_base
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.manifests import stored_sample

bnb = pytest.importorskip("bitsandbytes.functional")
TARGETS = ("q_proj", "v_proj")


def quantize_residual(dec: Path) -> None:
    """decompose --quantize nf4's residual, built by hand: each target residual weight as bitsandbytes NF4
    (blocksize 64, double quantisation) in transformers' layout, config.json's quantization_config, and the
    decompose manifest's residual fingerprints updated."""
    res = dec / "residual"
    for shard in sorted(res.glob("*.safetensors")):
        tensors, changed = load_file(shard), False
        for name in [n for n in list(tensors) if n.endswith(tuple(f"{t}.weight" for t in TARGETS))]:
            packed, state = bnb.quantize_4bit(tensors[name].float(), quant_type="nf4", blocksize=64,
                                              compress_statistics=True)
            tensors[name] = packed
            tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            changed = True
        if changed:
            save_file(tensors, shard, metadata={"format": "pt"})
    index = res / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {n: f for f in [p.name for p in res.glob("*.safetensors")] for n in load_file(res / f)}
        index.write_text(json.dumps(doc))
    config = json.loads((res / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
        "load_in_8bit": False, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_skip_modules": ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8"}
    (res / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((dec / "ailora.json").read_text())
    ckpt = Checkpoint.open(res)
    samples = manifest["applies_to"]["samples"]
    for t in samples:
        samples[t] = stored_sample(ckpt, t)
    manifest["applies_to"].get("residual", {})["samples"] = dict(samples)
    manifest["quantize"] = {"type": "nf4", "all": False, "loftq_iters": 0, "double_quant": True}
    (dec / "ailora.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama (hidden 128: W4A16 groups of 128) with a sentencepiece tokenizer, decomposed (PiSSA, r 4) with
    its q/v residual quantised to NF4, and an adapter 'trained' on it."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("qserve")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "model", max_shard_size="200KB")
    rows = [json.loads(line) for line in data_file("demo_train.jsonl").read_text().splitlines()]
    (root / "corpus.txt").write_text("\n".join(r["prompt"] + r["completion"] for r in rows))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "model" / "tokenizer"),
                                   vocab_size=100, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (root / "model" / "tokenizer.vocab").unlink()
    decompose(root / "model", root / "dec", method="pissa", rank=4, alpha=8, targets=TARGETS, progress=False)
    quantize_residual(root / "dec")
    fake_training(root / "dec" / "adapter", root / "trained", scale=0.05)
    return root


def test_fixture_is_what_transformers_loads_as_nf4(run):
    model = AutoModelForCausalLM.from_pretrained(run / "dec" / "residual", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def trained_logits(run, ids):
    """The trained model: the NF4 residual as transformers loads it, plus the adapter (PEFT)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(run / "dec" / "residual", dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, run / "trained").eval()(input_ids=ids).logits


IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def test_export_base_vllm_w4a16_loads_in_transformers(run, tmp_path):
    from peft import PeftModel

    s = export_base(run / "dec" / "residual", tmp_path / "out", server="vllm", adapter=run / "trained",
                    progress=False)
    print(json.dumps(s, indent=1))
