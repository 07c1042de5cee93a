"""Adapters as training would leave them (seeded noise on the factors), and an NF4-quantised residual built by hand."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.fingerprints import stored_sample
from ailora_tools.io.peft_adapter import read_adapter, write_adapter

#: the modules whose residual `quantize_residual` quantises
QUANTIZED_TARGETS = ("q_proj", "v_proj")


def fake_training(initial: Path, out: Path, *, seed=0, only_B=False, scale=0.05):
    """Change A and B as training would (seeded noise), keeping the initial config."""
    ad = read_adapter(initial)
    g = torch.Generator().manual_seed(seed)
    trained = {}
    for m, (A, B) in ad.factors.items():
        dA = torch.zeros_like(A) if only_B else torch.randn(A.shape, generator=g) * scale
        trained[m] = (A + dA, B + torch.randn(B.shape, generator=g) * scale)
    write_adapter(out, ad.config, trained)
    (out / "ailora-train.json").write_text(json.dumps({"initial_adapter": str(initial)}))
    return out


def randomize_lora(model, *, seed: int, scale: float):
    """Every lora_ parameter of a PEFT model set to seeded noise × `scale` (a B far from zero, as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def peft_converted_pair(model, tmp_path: Path):
    """A PEFT model (its adapter saved as TMP/init) trained by seeded noise on its lora_ parameters, then converted
    by PEFT (TMP/peftconv) and by us (TMP/ours, `convert --initial TMP/init`): (ours, PEFT's) as read back."""
    from ailora_tools import convert

    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "peftconv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    convert(tmp_path / "trained", tmp_path / "ours", initial=tmp_path / "init")
    return read_adapter(tmp_path / "ours"), read_adapter(tmp_path / "peftconv")


def fake_dora_training(adapter: Path, out: Path, *, seed=0, scale=0.05, trained_on=None):
    """Move A, B and m as training would (seeded noise), keeping the adapter's config."""
    ad = read_adapter(adapter, dora=True)
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: (A + torch.randn(A.shape, generator=g) * scale, B + torch.randn(B.shape, generator=g) * scale)
        for m, (A, B) in ad.factors.items()
    }
    mags = {m: v * (1 + torch.randn(v.shape, generator=g) * 0.1) for m, v in ad.magnitudes.items()}
    write_adapter(out, ad.config, factors, magnitudes=mags)
    record = {"initial_adapter": str(adapter)}
    if trained_on is not None:
        record["base"] = str(trained_on)
    (out / "ailora-train.json").write_text(json.dumps(record))
    return out


def quantize_residual(dec: Path, targets=QUANTIZED_TARGETS) -> None:
    """decompose --quantize nf4's residual, built by hand: each target residual weight as bitsandbytes NF4
    (blocksize 64, double quantisation) in transformers' layout, config.json's quantization_config (transformers'
    BitsAndBytesConfig's), and the decompose manifest's residual fingerprints updated."""
    import bitsandbytes.functional as bnb
    from transformers import BitsAndBytesConfig

    res = dec / "residual"
    for shard in sorted(res.glob("*.safetensors")):
        tensors, changed = load_file(shard), False
        for name in [n for n in list(tensors) if n.endswith(tuple(f"{t}.weight" for t in targets))]:
            packed, state = bnb.quantize_4bit(
                tensors[name].float(), quant_type="nf4", blocksize=64, compress_statistics=True
            )
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
    config["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float32",
        llm_int8_skip_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    ).to_dict()
    (res / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((dec / "ailora.json").read_text())
    ckpt = Checkpoint.open(res)
    samples = manifest["applies_to"]["samples"]
    for t in samples:
        samples[t] = stored_sample(ckpt, t)
    manifest["applies_to"].get("residual", {})["samples"] = dict(samples)
    manifest["quantize"] = {"type": "nf4", "all": False, "loftq_iters": 0, "double_quant": True}
    (dec / "ailora.json").write_text(json.dumps(manifest, indent=2))
