"""DoRA: decompose --dora from every init, get_ailora_model(dora=True), train, merge (= PEFT's
merge_and_unload), convert --dora exact / approximate."""

import json
from pathlib import Path

import pytest
import torch
from helpers import cli, killed_at_update, lm_logits, load, logits
from helpers.adapters import fake_dora_training
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from ailora_tools import convert, decompose, get_ailora_model, merge
from ailora_tools.adapters.check import check_adapter
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import NumericsError, OptionError, UnsupportedError
from ailora_tools.init.dora import (
    approximate_factors,
    exact_parts,
    magnitude,
    merged_weight,
)
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.training.trainer import train

DATA = data_file("demo_train.jsonl")
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("dora") / "base")


# ---- 1. DoRA from every init -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "ailora", "lora-da"])
def test_decompose_dora_loads_in_peft_and_reproduces_the_model_at_step_0(base, tmp_path, method):
    extra = {"data": DATA, "samples": 8, "max_length": 64} if method == "lora-da" else {}
    decompose(base, tmp_path / "d", method=method, rank=4, alpha=8, dora=True, progress=False, **extra)
    cfg = json.loads((tmp_path / "d" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["init_lora_weights"] is True
    ad = read_adapter(tmp_path / "d" / "adapter", dora=True)
    assert set(ad.magnitudes) == set(ad.factors)
    assert json.loads((tmp_path / "d" / "ailora.json").read_text())["dora"] is True
    on = base if method == "lora" else tmp_path / "d" / "residual"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(on, dtype=torch.float32), tmp_path / "d" / "adapter"
    )
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        got = model.eval()(input_ids=torch.randint(4, 90, (2, 16))).logits
    assert (got - lm_logits(base)).abs().max() <= 1e-5


def test_get_ailora_model_dora_equals_decompose_and_keeps_step_0(base, tmp_path):
    decompose(base, tmp_path / "d", method="pissa", rank=4, alpha=8, svd="exact", dora=True, progress=False)
    expected = lm_logits(base)
    model = get_ailora_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        method="pissa",
        rank=4,
        alpha=8,
        svd="exact",
        dora=True,
        progress=False,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        got = model.eval()(input_ids=torch.randint(4, 90, (2, 16))).logits
    assert (got - expected).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "mem")
    ours, theirs = read_adapter(tmp_path / "mem", dora=True), read_adapter(tmp_path / "d" / "adapter", dora=True)
    for m, v in theirs.magnitudes.items():
        torch.testing.assert_close(ours.magnitudes[m], v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])  # Conv1D (transposed), an encoder
def test_get_ailora_model_dora_keeps_step_0_on_other_architectures(tiny, kind):
    src = Path(tiny(kind))
    expected = logits(load(src, kind), kind)
    model = get_ailora_model(
        load(src, kind),
        method="ailora" if kind == "bert" else "pissa",
        rank=4,
        alpha=8,
        targets=TARGETS[kind],
        dora=True,
        progress=False,
    )
    assert (logits(model.eval(), kind) - expected).abs().max() <= 1e-5


def test_dora_refuses_no_residual_for_offsetting_methods(base, tmp_path):
    with pytest.raises(OptionError, match="^dora: not with no_residual for method pissa"):
        decompose(base, tmp_path / "d", method="pissa", rank=4, dora=True, no_residual=True, progress=False)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_train_dora_moves_the_model_and_round_trips(base, tmp_path, monkeypatch):
    decompose(base, tmp_path / "d", method="ailora", rank=4, alpha=8, dora=True, progress=False)
    res = cli("decompose", base, "-o", tmp_path / "d2", "--method", "lora", "--rank", "4", "--dora", "--quiet")
    assert res.exit_code == 0, res.output
    args = (tmp_path / "d" / "residual", tmp_path / "d" / "adapter", DATA)
    opts = dict(max_steps=4, lr=1e-2, batch_size=8, save_every=2, progress=False)
    train(*args, tmp_path / "t", **opts)
    with killed_at_update(monkeypatch, 4):  # killed after step 3: resumes from the step-2 checkpoint
        train(*args, tmp_path / "r", **opts)
    train(*args, tmp_path / "r", resume=True, **opts)
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "r" / "adapter_model.safetensors"
    ).read_bytes()  # magnitudes restored with the factors
    trained = read_adapter(tmp_path / "t", dora=True)
    initial = read_adapter(tmp_path / "d" / "adapter", dora=True)
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["use_dora"] is True
    moved = max(float((trained.magnitudes[m] - v).abs().max()) for m, v in initial.magnitudes.items())
    assert moved > 0  # the magnitudes train
    after = lm_logits(tmp_path / "d" / "residual", tmp_path / "t")
    assert (after - lm_logits(base)).abs().max() > 1e-3
    # the trained DoRA model, served exactly as a new base + a standard LoRA
    convert(tmp_path / "t", tmp_path / "x", dora="exact", progress=False)
    assert (lm_logits(tmp_path / "x" / "base", tmp_path / "x" / "adapter") - after).abs().max() <= 1e-4
    # plain DoRA on the original model trains too (B0 = 0: nothing subtracted)
    train(base, tmp_path / "d2" / "adapter", DATA, tmp_path / "t2", max_steps=2, lr=1e-2, batch_size=8, progress=False)
    assert (lm_logits(base, tmp_path / "t2") - lm_logits(base)).abs().max() > 1e-4


# ---- 3. merge = PEFT's merge_and_unload -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["pissa", "lora"])  # adapter on the residual / on the original base
def test_merge_dora_equals_peft_merge_and_unload(tiny, tmp_path, kind, method):
    src = Path(tiny(kind))
    decompose(src, tmp_path / "d", method=method, rank=4, alpha=8, targets=TARGETS[kind], dora=True, progress=False)
    on = src if method == "lora" else tmp_path / "d" / "residual"
    fake_dora_training(tmp_path / "d" / "adapter", tmp_path / "t")
    peft_model = PeftModel.from_pretrained(load(on, kind), tmp_path / "t").eval()
    expected_dora = logits(peft_model, kind)
    peft_merged = peft_model.merge_and_unload()
    expected = logits(peft_merged, kind)
    assert (expected - expected_dora).abs().max() <= 1e-5
    assert (expected - logits(load(on, kind), kind)).abs().max() > 1e-3  # the adapter matters
    merge(on, tmp_path / "t", tmp_path / "m", progress=False)
    ours = load(tmp_path / "m", kind)
    assert (logits(ours, kind) - expected).abs().max() <= 1e-5
    theirs = peft_merged.state_dict()
    for name, w in ours.state_dict().items():
        torch.testing.assert_close(w, theirs[name], atol=1e-5, rtol=1e-5)


def test_dora_maths_match_peft_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10)
    model = get_peft_model(
        torch.nn.Sequential(layer), LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True)
    )
    dora = model.base_model.model[0]
    with torch.no_grad():
        dora.lora_B["default"].weight.normal_()
        dora.lora_magnitude_vector["default"].weight.mul_(1.3)
    W = dora.get_base_layer().weight.detach().clone()
    A, B = dora.lora_A["default"].weight.detach(), dora.lora_B["default"].weight.detach()
    m = dora.lora_magnitude_vector["default"].weight.detach()
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = model(x)
    ours = merged_weight(W, A, B, 2.0, m).float()
    torch.testing.assert_close(x @ ours.T + layer.bias, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_weight(W.T, A, B, 2.0, m, transposed=True).T, merged_weight(W, A, B, 2.0, m))
    new_base, DB = exact_parts(W, A, B, 2.0, m)
    torch.testing.assert_close(new_base + 2.0 * DB @ A.double(), merged_weight(W, A, B, 2.0, m))
    torch.testing.assert_close(magnitude(W, A, B * 0, 2.0), torch.linalg.vector_norm(W, dim=1))


# ---- 4. DoRA → LoRA -------------------------------------------------------------------------------------------


@pytest.fixture
def trained_dora(base, tmp_path):
    decompose(base, tmp_path / "d", method="pissa", rank=4, alpha=8, dora=True, progress=False)
    fake_dora_training(tmp_path / "d" / "adapter", tmp_path / "t", trained_on=tmp_path / "d" / "residual")
    return tmp_path


def test_convert_dora_exact_serves_the_trained_model(base, trained_dora):
    tmp = trained_dora
    res = cli("convert", "--trained", tmp / "t", "-o", tmp / "x", "--dora", "exact")
    assert res.exit_code == 0, res.output
    assert "the base is NOT the original model" in res.output
    expected = lm_logits(tmp / "d" / "residual", tmp / "t")
    got = lm_logits(tmp / "x" / "base", tmp / "x" / "adapter")
    assert (got - expected).abs().max() <= 1e-4
    manifest = json.loads((tmp / "x" / "ailora-convert.json").read_text())
    assert manifest["base_is_original"] is False and manifest["dora"] == "exact"
    cfg = json.loads((tmp / "x" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and cfg["r"] == 4
    assert check_adapter(tmp / "x" / "adapter", target="vllm", max_lora_rank=16) == []
    # only the adapted matrices of the base changed
    src = AutoModelForCausalLM.from_pretrained(tmp / "d" / "residual", dtype=torch.float32).state_dict()
    new = AutoModelForCausalLM.from_pretrained(tmp / "x" / "base", dtype=torch.float32).state_dict()
    changed = {n for n in src if not torch.equal(src[n], new[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    # the LoRA belongs to OUT/base: merged onto the model it was trained on (or the original) it is refused
    refused = cli("merge", tmp / "d" / "residual", tmp / "x" / "adapter", "-o", tmp / "wrong")
    assert refused.exit_code == 1 and str(tmp / "x" / "base") in refused.output and not (tmp / "wrong").exists()
    assert cli("merge", tmp / "x" / "base", tmp / "x" / "adapter", "-o", tmp / "right").exit_code == 0


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "bert"])
def test_convert_dora_exact_and_full_rank_approximate_on_every_architecture(tiny, tmp_path, kind):
    src = Path(tiny(kind))
    decompose(src, tmp_path / "d", method="pissa", rank=4, alpha=8, targets=TARGETS[kind], dora=True, progress=False)
    fake_dora_training(tmp_path / "d" / "adapter", tmp_path / "t", trained_on=tmp_path / "d" / "residual")
    expected = logits(PeftModel.from_pretrained(load(tmp_path / "d" / "residual", kind), tmp_path / "t").eval(), kind)
    convert(tmp_path / "t", tmp_path / "x", dora="exact", progress=False)
    got = logits(
        PeftModel.from_pretrained(load(tmp_path / "x" / "base", kind), tmp_path / "x" / "adapter").eval(), kind
    )
    assert (got - expected).abs().max() <= 1e-4
    convert(tmp_path / "t", tmp_path / "a", dora="approximate", max_rank=128, progress=False)
    got = logits(PeftModel.from_pretrained(load(src, kind), tmp_path / "a").eval(), kind)
    assert (got - expected).abs().max() <= 1e-4


def test_convert_dora_exact_exports_to_llama_cpp(trained_dora):
    from ailora_tools.adapters.gguf_export import export_gguf

    tmp = trained_dora
    convert(tmp / "t", tmp / "x", dora="exact", progress=False)
    summary = export_gguf(tmp / "x" / "adapter", tmp / "x" / "base", tmp / "x.gguf")
    assert (tmp / "x.gguf").is_file() and summary


def test_convert_dora_approximate_reports_the_measured_error(base, trained_dora):
    tmp = trained_dora
    res = cli("convert", "--trained", tmp / "t", "-o", tmp / "a", "--dora", "approximate", "--max-rank", "8", "--json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)["errors"]
    lora = read_adapter(tmp / "a")
    assert lora.config["base_model_name_or_path"] == str(base) and lora.config["r"] == 8
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp / "d" / "residual", dtype=torch.float32), tmp / "t"
    )
    target = peft_merged.merge_and_unload().state_dict()
    assert set(printed) == set(lora.factors)
    for m, err in printed.items():
        W, Wp = original[m + ".weight"].double(), target[m + ".weight"].double()
        measured = float(torch.linalg.norm(W + lora.delta(m).double() - Wp) / torch.linalg.norm(Wp - W))
        assert abs(measured - err) <= 1e-4 * max(err, 1e-3), (m, measured, err)
    # full rank: exact up to rounding, so the LoRA on the original gives the trained model
    assert (
        cli(
            "convert", "--trained", tmp / "t", "-o", tmp / "f", "--dora", "approximate", "--max-rank", "128", "--json"
        ).exit_code
        == 0
    )
    expected = lm_logits(tmp / "d" / "residual", tmp / "t")
    assert (lm_logits(base, tmp / "f") - expected).abs().max() <= 1e-4


def test_convert_dora_approximate_tolerance_fails_unless_accepted(trained_dora):
    tmp = trained_dora
    with pytest.raises(NumericsError, match=r"relative error above --tolerance 1e-06 in .*--accept-error"):
        convert(tmp / "t", tmp / "a", dora="approximate", max_rank=2, tolerance=1e-6)
    s = convert(tmp / "t", tmp / "a", dora="approximate", max_rank=2, tolerance=1e-6, accept_error=True)
    assert s["accepted_errors"] and s["worst_rel_fro_error"] > 1e-6 and s["rank"] == 2
    s = convert(tmp / "t", tmp / "b", dora="approximate", tolerance=0.5)  # the smallest rank meeting it
    assert s["worst_rel_fro_error"] <= 0.5 and not s["accepted_errors"]


def test_dora_errors_are_one_line(trained_dora, tmp_path):
    tmp = trained_dora
    res = cli("convert", "--trained", tmp / "t", "-o", tmp / "n")
    assert res.exit_code == 1 and "a DoRA adapter (use_dora is true); choose --dora exact" in res.output
    with pytest.raises(OptionError, match="--dora approximate: give --max-rank R, --tolerance X, or both"):
        convert(tmp / "t", tmp / "n", dora="approximate")
    with pytest.raises(OptionError, match="--dora exact: keeps the rank"):
        convert(tmp / "t", tmp / "n", dora="exact", max_rank=4)
    res = cli("check", tmp / "t", "--for", "vllm")
    assert res.exit_code == 1 and "ailora-tools merge" in res.output and "--dora exact" in res.output


def test_convert_dora_refuses_a_base_that_contradicts_the_recorded_one(base, trained_dora):
    """--base is refused as --initial is: another model's weights (both modes), and for exact, whose LoRA applies to
    OUT/base, any other model than the recorded original; that one (or a copy) is accepted."""
    tmp = trained_dora
    other = build_tiny_model(tmp / "other", seed=1)
    for mode, flags in (("exact", []), ("approximate", ["--max-rank", "8"])):
        res = cli("convert", "--trained", tmp / "t", "-o", tmp / f"o-{mode}", "--dora", mode, "--base", other, *flags)
        assert res.exit_code == 1 and str(other) in res.output and not (tmp / f"o-{mode}").exists(), res.output
    res = cli("convert", "--trained", tmp / "t", "-o", tmp / "hub", "--dora", "exact", "--base", "org/another-model")
    assert res.exit_code == 1 and "drop --base" in res.output and not (tmp / "hub").exists()
    convert(tmp / "t", tmp / "ah", dora="approximate", max_rank=8, base="org/another-model", progress=False)
    assert read_adapter(tmp / "ah").config["base_model_name_or_path"] == "org/another-model"  # recorded as given
    assert cli("convert", "--trained", tmp / "t", "-o", tmp / "x", "--dora", "exact", "--base", base).exit_code == 0


def test_approximate_factors_error_is_the_dropped_energy():
    torch.manual_seed(0)
    delta = torch.randn(20, 16, dtype=torch.float64)
    B, A, err, norm = approximate_factors(delta, max_rank=5, tolerance=None)
    assert B.shape == (20, 5) and A.shape == (5, 16)
    assert abs(err - float(torch.linalg.norm(delta - B @ A) / norm)) < 1e-12
    B, A, err, _ = approximate_factors(delta, max_rank=None, tolerance=0.3)
    assert err <= 0.3 and approximate_factors(delta, max_rank=A.shape[0] - 1, tolerance=None)[2] > 0.3
    with pytest.raises(UnsupportedError):
        from ailora_tools.init.dora import check_initial_offset
        from ailora_tools.io.peft_adapter import Adapter

        check_initial_offset(Adapter({"use_dora": True}, {"x": (torch.ones(1, 2), torch.ones(2, 1))}))
