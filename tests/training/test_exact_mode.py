"""What was trained is what is served: training on the ORIGINAL weights with s·B0·A0 subtracted inside the
adapter (decompose --no-residual) against the default residual, on a bfloat16 checkpoint."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ailora_tools import convert, decompose
from ailora_tools.cli import main
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import TargetError
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.training.exact_mode import subtract_initial
from ailora_tools.training.trainer import train
from ailora_tools.verify import verify

TOL = 1e-5  # float32 rounding, relative to the largest |logit|


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """A bfloat16 tiny Llama (4 blocks, char tokenizer), decomposed both ways and trained both ways."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("exact")
    build_tiny_model(root / "f32")
    AutoModelForCausalLM.from_pretrained(root / "f32").to(torch.bfloat16).save_pretrained(
        root / "base", max_shard_size="200KB"
    )
    for f in (root / "f32").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, root / "base" / f.name)
    decompose(root / "base", root / "res", rank=4, progress=False)
    decompose(root / "base", root / "orig", rank=4, no_residual=True, progress=False)
    opts = dict(max_steps=20, lr=1e-2, batch_size=16, progress=False)
    train(root / "res" / "residual", root / "res" / "adapter", data_file("demo_train.jsonl"), root / "t-res", **opts)
    train(root / "base", root / "orig" / "adapter", data_file("demo_train.jsonl"), root / "t-orig", **opts)
    convert(root / "t-res", root / "lora-res")
    convert(root / "t-orig", root / "lora-orig")
    return root


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _with(base, adapter, *, subtract=None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_model(base), adapter).eval()
    if subtract is not None:
        subtract_initial(model, read_adapter(subtract))
    return model


def _logits(model):
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (3, 24))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_no_residual_writes_only_the_adapter_with_the_same_factors(bf16):
    assert sorted(p.name for p in (bf16 / "orig").iterdir()) == ["adapter", "ailora.json"]
    same, other = read_adapter(bf16 / "orig" / "adapter"), read_adapter(bf16 / "res" / "adapter")
    assert same.factors.keys() == other.factors.keys()
    assert all(torch.equal(a, b) for m in same.factors for a, b in zip(same.factors[m], other.factors[m]))
    orig, res = (json.loads((bf16 / d / "ailora.json").read_text()) for d in ("orig", "res"))
    assert (orig["adapter_base"], res["adapter_base"]) == ("original", "residual")
    assert same.config["base_model_name_or_path"] == str(bf16 / "base")  # the adapter applies to the original
    manifests = {d: json.loads((bf16 / d / "ailora-train.json").read_text()) for d in ("t-orig", "t-res")}
    assert (manifests["t-orig"]["adapter_base"], manifests["t-orig"]["mode"]) == ("original", "exact")
    assert (manifests["t-res"]["adapter_base"], manifests["t-res"]["mode"]) == ("residual", "residual")


def test_exact_training_starts_at_the_original_model(bf16):
    start = _with(bf16 / "base", bf16 / "orig" / "adapter", subtract=bf16 / "orig" / "adapter")
    assert _rel(_logits(start), _logits(_model(bf16 / "base"))) <= TOL


def test_trained_equals_served_exactly_only_without_the_residual(bf16):
    """Original + converted LoRA (what vLLM/PEFT serve) against the model as it was trained."""
    served_exact = _logits(_with(bf16 / "base", bf16 / "lora-orig"))
    trained_exact = _logits(_with(bf16 / "base", bf16 / "t-orig", subtract=bf16 / "orig" / "adapter"))
    assert _rel(served_exact, trained_exact) <= TOL

    # the trained model computed independently of the hooks: W + s(B·A − B0·A0) merged in float64
    merged = _model(bf16 / "base")
    init, done = read_adapter(bf16 / "orig" / "adapter"), read_adapter(bf16 / "t-orig")
    with torch.no_grad():
        for m, (A, B) in done.factors.items():
            A0, B0 = init.factors[m]
            W = merged.get_submodule(m).weight
            W.copy_(
                W.double() + done.scale(m) * (B.double() @ A.double()) - init.scale(m) * (B0.double() @ A0.double())
            )
    assert _rel(served_exact, _logits(merged)) <= TOL

    # the default way is NOT exact on a bf16 checkpoint: the residual was rounded to bf16
    served_res = _logits(_with(bf16 / "base", bf16 / "lora-res"))
    trained_res = _logits(_with(bf16 / "res" / "residual", bf16 / "t-res"))
    assert _rel(served_res, trained_res) > 30 * TOL
    # and both ways learned: the adapter moved away from the original model
    assert _rel(trained_exact, _logits(_model(bf16 / "base"))) > 1e-2


def test_wrong_base_for_the_mode_is_refused(bf16, tmp_path):
    data = data_file("demo_train.jsonl")
    with pytest.raises(TargetError, match=r"applies to the residual .* is the original model"):
        train(bf16 / "base", bf16 / "res" / "adapter", data, tmp_path / "a", max_steps=1, progress=False)
    with pytest.raises(TargetError, match=r"applies to the original model .* is a residual decompose wrote"):
        train(bf16 / "res" / "residual", bf16 / "orig" / "adapter", data, tmp_path / "b", max_steps=1, progress=False)
    with pytest.raises(TargetError, match=r"--adapter-base residual: the initial adapter .* relative to the original"):
        train(
            bf16 / "base",
            bf16 / "orig" / "adapter",
            data,
            tmp_path / "c",
            max_steps=1,
            adapter_base="residual",
            progress=False,
        )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_adapter_base_original_without_a_manifest(bf16, tmp_path):
    """A bare initial adapter (no decompose manifest) trains exactly with --adapter-base original."""
    shutil.copytree(bf16 / "orig" / "adapter", tmp_path / "bare")
    opts = dict(max_steps=3, lr=1e-2, batch_size=16, progress=False)
    s = train(
        bf16 / "base", tmp_path / "bare", data_file("demo_train.jsonl"), tmp_path / "t", adapter_base="original", **opts
    )
    ref = train(bf16 / "base", bf16 / "orig" / "adapter", data_file("demo_train.jsonl"), tmp_path / "ref", **opts)
    assert s["adapter_base"] == "original" and s["last_loss"] == ref["last_loss"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "t", tmp_path / "ref"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_no_residual(bf16, tmp_path):
    res = CliRunner().invoke(
        main, ["decompose", str(bf16 / "base"), "-o", str(tmp_path / "o"), "--rank", "4", "--no-residual", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "ailora.json").read_text())["adapter_base"] == "original"
    assert not (tmp_path / "o" / "residual").exists()
    report = verify(tmp_path / "o")
    assert report["problems"] == [] and report["files_checked"] == 2
    res = CliRunner().invoke(
        main,
        ["decompose", str(bf16 / "base"), "-o", str(tmp_path / "p"), "--no-residual", "--residual-dtype", "float32"],
    )
    assert res.exit_code == 1 and "--no-residual writes no residual" in res.output
