"""A classifier's adapter loaded the ways the README shows, on a tiny BERT with its own head:
decompose's adapter on `AutoModelForSequenceClassification` with PEFT, and the Python API's routes from a model
trained with `get_ailora_model` to a LoRA on the original (`convert`, or the rebuilt residual), on logits."""

import torch
from helpers.encoders import PARITY, build_encoder, decompose, outputs
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from ailora_tools import convert, get_ailora_model


def cls_model(path):
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


def test_decompose_adapter_of_a_classifier_loads_with_peft_as_documented(tmp_path):
    src = build_encoder("bert-cls", tmp_path / "src")
    dec = decompose(src, tmp_path / "dec")
    # the README's way: PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE), ADAPTER)
    model = PeftModel.from_pretrained(cls_model(dec / "residual"), dec / "adapter")
    assert (outputs(model, src) - outputs(cls_model(src), src)).abs().max() <= PARITY  # residual + A0B0 = original


def trained_with_the_python_api(src, tmp_path):
    """get_ailora_model on a classifier, the initial adapter saved, then 'training': every factor and the head moved."""
    model = get_ailora_model(cls_model(src), method="pissa", rank=4, targets="query,value", progress=False)
    model.save_pretrained(tmp_path / "init")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:  # lora_A/B and the head (modules_to_save)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "trained")
    return model, outputs(model, src)


def test_python_api_classifier_converts_with_its_trained_head(tmp_path):
    src = build_encoder("bert-cls", tmp_path / "src")
    model, expected = trained_with_the_python_api(src, tmp_path)
    convert(tmp_path / "trained", tmp_path / "lora", initial=tmp_path / "init")  # the README's documented route
    got = outputs(PeftModel.from_pretrained(cls_model(src), tmp_path / "lora"), src)
    assert (got - expected).abs().max() <= PARITY
    # the other documented route: the residual rebuilt by the same settings, the trained adapter on it
    rebuilt = get_ailora_model(cls_model(src), method="pissa", rank=4, targets="query,value", progress=False).unload()
    got = outputs(PeftModel.from_pretrained(rebuilt, tmp_path / "trained"), src)
    assert (got - expected).abs().max() <= PARITY
    # PEFT's own route keeps the LoRA factors only: the trained head is dropped (the README says so)
    model.save_pretrained(tmp_path / "peft-lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with safe_open(str(tmp_path / "peft-lora" / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and not any("classifier" in k for k in f.keys())
