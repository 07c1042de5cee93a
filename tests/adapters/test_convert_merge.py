"""convert and merge: parity on logits, exact re-compression, PEFT agreement."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import load, logits
from helpers.adapters import fake_training, peft_converted_pair
from peft import LoraConfig, PeftModel, get_peft_model

from ailora_tools import convert, decompose, merge
from ailora_tools.cli import main
from ailora_tools.errors import AiloraError, NumericsError, TargetError
from ailora_tools.io.peft_adapter import read_adapter, write_adapter


@pytest.fixture(params=["llama", "qwen2"])
def workflow(request, tiny, tmp_path):
    kind = request.param
    src = Path(tiny(kind))
    decompose(src, tmp_path / "dec", rank=4, alpha=8, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained")
    return kind, src, tmp_path


def test_convert_then_peft_on_original_matches_trained_on_residual(workflow):
    kind, src, tmp = workflow
    summary = convert(tmp / "trained", tmp / "lora")  # --initial found through the training manifest
    cfg = json.loads((tmp / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16.0, True)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["base_model_name_or_path"] == str(src)
    assert summary["vllm_max_lora_rank"] == 8 and summary["worst_rel_fro_error"] == 0.0
    expected = logits(PeftModel.from_pretrained(load(tmp / "dec" / "residual", kind), tmp / "trained"), kind)
    got = logits(PeftModel.from_pretrained(load(src, kind), tmp / "lora"), kind)
    assert (got - expected).abs().max() <= 1e-4
    assert (expected - logits(load(src, kind), kind)).abs().max() > 1e-3  # training changed something

    merge(tmp / "dec" / "residual", tmp / "trained", tmp / "m1", progress=False)
    merge(src, tmp / "lora", tmp / "m2", progress=False)
    for m in ("m1", "m2"):
        assert (logits(load(tmp / m, kind), kind) - expected).abs().max() <= 1e-4
    w1, w2 = load(tmp / "m1", kind).state_dict(), load(tmp / "m2", kind).state_dict()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-6, rtol=1e-5)
    assert sorted(p.name for p in (tmp / "m1").iterdir() if not p.name.startswith("ailora")) == sorted(
        p.name for p in src.iterdir()
    )


def test_max_rank_exact_when_true_rank_fits(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "dec", rank=4, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained", only_B=True)  # ΔW = s·δB·A0: rank ≤ 4
    full = convert(tmp_path / "trained", tmp_path / "full")
    small = convert(tmp_path / "trained", tmp_path / "small", max_rank=4, tolerance=1e-6)
    assert small["rank"] == 4 and small["worst_rel_fro_error"] < 1e-7
    a, b = read_adapter(tmp_path / "full"), read_adapter(tmp_path / "small")
    for m in a.factors:
        torch.testing.assert_close(b.delta(m), a.delta(m), atol=1e-6, rtol=0)
    assert full["rank"] == 8


def test_max_rank_error_equals_dropped_singular_energy(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "dec", rank=4, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained")
    summary = convert(tmp_path / "trained", tmp_path / "small", max_rank=4)
    init, tr = read_adapter(tmp_path / "dec" / "adapter"), read_adapter(tmp_path / "trained")
    small = read_adapter(tmp_path / "small")
    for m, err in summary["errors"].items():
        dW = tr.delta(m).double() - init.delta(m).double()
        S = torch.linalg.svdvals(dW)
        assert (S[:8] > 1e-6).all() and (S[8:] < 1e-5).all()  # full rank 2r = 8
        ref = float(S[4:].square().sum().sqrt() / S.square().sum().sqrt())
        assert err == pytest.approx(ref, rel=1e-4)
        assert float((small.delta(m).double() - dW).norm() / dW.norm()) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(NumericsError, match=r"above --tolerance 0.001 in model\.layers\.0\.self_attn\.q_proj"):
        convert(tmp_path / "trained", tmp_path / "fail", max_rank=4, tolerance=1e-3)
    assert not (tmp_path / "fail" / "adapter_config.json").exists()


def test_untrained_adapter_is_reported(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "dec", rank=4, progress=False)
    with pytest.raises(AiloraError, match=r"equals the initial one.*ΔW = 0"):
        convert(tmp_path / "dec" / "adapter", tmp_path / "lora", initial=tmp_path / "dec" / "adapter")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_pissa_pair_converts_like_peft(tiny, tmp_path, rslora):
    src = tiny("llama")
    model = get_peft_model(
        load(src, "llama"),
        LoraConfig(
            r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
        ),
    )
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    ours, theirs = peft_converted_pair(model, tmp_path)
    assert ours.config["r"] == theirs.config["r"] == 8
    assert ours.config["lora_alpha"] == pytest.approx(theirs.config["lora_alpha"])
    for m in theirs.factors:
        torch.testing.assert_close(ours.delta(m), theirs.delta(m), atol=1e-6, rtol=0)


def test_merge_matches_peft_merge_and_unload_with_patterns(tiny, tmp_path):
    src = tiny("qwen2")
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 3},
        init_lora_weights=False,
    )
    model = get_peft_model(load(src, "qwen2"), cfg)
    model.save_pretrained(tmp_path / "lora")
    merged = model.merge_and_unload()
    merge(src, tmp_path / "lora", tmp_path / "merged", progress=False)
    ours = load(tmp_path / "merged", "qwen2").state_dict()
    changed = 0
    for name, w in merged.state_dict().items():
        torch.testing.assert_close(ours[name], w, atol=1e-6, rtol=1e-6)
        changed += not torch.equal(w, load(src, "qwen2").state_dict()[name]) if "proj" in name else 0
    assert changed >= 6


def test_merge_rejects_adapter_for_another_base(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "dec", rank=4, progress=False)
    with pytest.raises(
        TargetError,
        match=r"adapts module 'model.layers.0.self_attn.q_proj' but the base .* has no "
        r"tensor model.layers.0.self_attn.q_proj.weight",
    ):
        merge(tiny("bert"), tmp_path / "dec" / "adapter", tmp_path / "m", progress=False)
    ad = read_adapter(tmp_path / "dec" / "adapter")
    write_adapter(tmp_path / "narrow", ad.config, {m: (A, B[:16]) for m, (A, B) in ad.factors.items()})
    with pytest.raises(TargetError, match=r"is 16x64 in the adapter but .*q_proj.weight in .* is 64x64"):
        merge(tiny("llama"), tmp_path / "narrow", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_cli_convert_and_merge(workflow):
    kind, src, tmp = workflow
    res = CliRunner().invoke(main, ["convert", "--trained", str(tmp / "trained"), "-o", str(tmp / "lora")])
    assert res.exit_code == 0, res.output
    assert "--max-lora-rank 8" in res.output
    res = CliRunner().invoke(main, ["merge", str(src), str(tmp / "lora"), "-o", str(tmp / "merged"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["modules"] == 4
