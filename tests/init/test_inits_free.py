"""PEFT's data-free inits as ours: olora, mica, orthogonal against PEFT 0.21's own init on a tiny Llama and a tiny
BERT (factors, residual base, step-0 logits), then decompose → train → convert → merge with logits parity, the
servers' exports, get_ailora_model, a PEFT-made OLoRA pair converted with --initial, and a compare row each."""

import json

import pytest
import torch
from helpers import cli, compare_briefly, load, logits, one_line_error
from helpers import lm_logits as lm
from helpers.adapters import peft_converted_pair
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from ailora_tools import convert, decompose, get_ailora_model, merge, spectrum
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.init.svd import generator_for
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.training.trainer import train

TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
DATA = data_file("demo_train.jsonl")


def peft_model(src, kind, method, **kw):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=method, **kw)
    return get_peft_model(load(src, kind), cfg).eval()


def peft_parts(model):
    """PEFT's factors per module (A, B) and its base weights by module, under our module names."""
    state = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    mods = {k.removesuffix(".lora_A.default.weight") for k in state if k.endswith(".lora_A.default.weight")}
    return (
        {m: (state[f"{m}.lora_A.default.weight"], state[f"{m}.lora_B.default.weight"]) for m in mods},
        {m: state[f"{m}.base_layer.weight"] for m in mods},
    )


def weights_of(d, modules):
    weights = {}
    for f in d.glob("*.safetensors"):
        weights.update(load_file(f))
    return {m: weights[f"{m}.weight"] for m in modules}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_olora_matches_peft(tiny, tmp_path, kind):
    src = tiny(kind)
    model = peft_model(src, kind, "olora")
    theirs, their_base = peft_parts(model)
    decompose(src, tmp_path / "d", method="olora", rank=4, alpha=8, progress=False)
    ours = read_adapter(tmp_path / "d" / "adapter").factors
    assert set(ours) == set(theirs) and len(ours) == 4
    for m, (A, B) in theirs.items():  # QR's signs are LAPACK's in both: compared as they are
        torch.testing.assert_close(ours[m][0], A, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours[m][1], B, atol=2e-6, rtol=0)
    original = weights_of(src, theirs)
    for m, W in weights_of(tmp_path / "d" / "residual", theirs).items():  # W − s·B0·A0 with s = 8/4
        torch.testing.assert_close(W, their_base[m], atol=2e-5, rtol=0)
        assert (W - original[m]).abs().max() > 1e-2
    ref, theirs_out = logits(load(src, kind), kind), logits(model, kind)
    ours_out = logits(
        PeftModel.from_pretrained(load(tmp_path / "d" / "residual", kind), tmp_path / "d" / "adapter"), kind
    )
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_out, ref, atol=1e-5, rtol=0)  # step 0 is the model


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mica_matches_peft(tiny, tmp_path, kind):
    src = tiny(kind)
    model = peft_model(src, kind, "mica")
    theirs, their_base = peft_parts(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)  # PEFT freezes B
    decompose(src, tmp_path / "d", method="mica", rank=4, alpha=8, progress=False)
    manifest = json.loads((tmp_path / "d" / "ailora.json").read_text())
    assert manifest["frozen"] == ["lora_B"] and manifest["no_offset"] and manifest["adapter_base"] == "original"
    assert not (tmp_path / "d" / "residual").exists()
    ours = read_adapter(tmp_path / "d" / "adapter").factors
    for m, (A, B) in theirs.items():
        assert not A.any() and not ours[m][0].any()
        signs = torch.sign((ours[m][1] * B).sum(0))  # singular vectors: each column's sign is free
        torch.testing.assert_close(ours[m][1] * signs, B, atol=1e-4, rtol=0)
    ref = logits(load(src, kind), kind)
    torch.testing.assert_close(logits(model, kind), ref, atol=0, rtol=0)
    ours_out = logits(PeftModel.from_pretrained(load(src, kind), tmp_path / "d" / "adapter"), kind)
    torch.testing.assert_close(ours_out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_orthogonal_matches_peft_with_the_same_draws(tiny, tmp_path, kind):
    """PEFT draws from the global RNG; ours from a generator per module: PEFT's own `orthogonal_init`, run with the
    global seed set to that generator's seed, gives our factors bit for bit."""
    src = tiny(kind)
    decompose(src, tmp_path / "d", method="orthogonal", rank=4, alpha=8, seed=5, progress=False)
    ours = read_adapter(tmp_path / "d" / "adapter").factors
    model = peft_model(src, kind, "orthogonal")
    ref = logits(load(src, kind), kind)
    torch.testing.assert_close(logits(model, kind), ref, atol=1e-5, rtol=0)  # B0·A0 = 0: PEFT's step 0 too
    for name, layer in model.base_model.model.named_modules():
        if hasattr(layer, "orthogonal_init"):
            torch.manual_seed(generator_for(5, name, torch.device("cpu")).initial_seed())
            layer.orthogonal_init("default")
    theirs, _ = peft_parts(model)
    for m, (A, B) in theirs.items():
        assert torch.equal(ours[m][0], A) and torch.equal(ours[m][1], B), m
        assert float((B.double() @ A.double()).abs().max()) < 1e-7 < float(B.abs().max() * A.abs().max())
    ours_out = logits(PeftModel.from_pretrained(load(src, kind), tmp_path / "d" / "adapter"), kind)
    torch.testing.assert_close(ours_out, logits(model, kind), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_out, ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("free") / "base")


@pytest.mark.parametrize("method,rank", [("olora", 8), ("mica", 4), ("orthogonal", 4)])
def test_decompose_train_convert_merge_parity(base, tmp_path, method, rank):
    decompose(base, tmp_path / "d", method=method, rank=4, progress=False)
    on = tmp_path / "d" / "residual" if method == "olora" else base
    assert (lm(on, tmp_path / "d" / "adapter") - lm(base)).abs().max() < 1e-4  # step 0 is the model
    train(on, tmp_path / "d" / "adapter", DATA, tmp_path / "t", max_steps=3, lr=1e-2, batch_size=8, progress=False)
    init, trained = read_adapter(tmp_path / "d" / "adapter"), read_adapter(tmp_path / "t")
    frozen = json.loads((tmp_path / "t" / "ailora-train.json").read_text()).get("frozen")
    assert frozen == (["lora_B"] if method == "mica" else None)
    for m, (A, B) in trained.factors.items():
        assert torch.equal(B, init.factors[m][1]) == (method == "mica") and not torch.equal(A, init.factors[m][0])
    s = convert(tmp_path / "t", tmp_path / "l")
    assert s["rank"] == rank and s["worst_rel_fro_error"] == 0.0  # olora: rank 2r on the original; else rank r
    merge(base, tmp_path / "l", tmp_path / "m", progress=False)
    rows = spectrum(base, tmp_path / "s", rank=4, adapter=tmp_path / "t", device="cpu", progress=False)["rows"]
    lora = read_adapter(tmp_path / "l")
    for r in rows:  # ‖ΔW‖_F as convert's LoRA gives it (no offset subtracted for mica and orthogonal)
        assert r["delta_fro"] == pytest.approx(float(lora.delta(r["module"]).norm()), rel=1e-4)
    out = lm(on, tmp_path / "t")
    assert (out - lm(base)).abs().max() > 1e-3
    assert (out - lm(base, tmp_path / "l")).abs().max() < 1e-4
    assert (out - lm(tmp_path / "m")).abs().max() < 1e-4
    served = convert(tmp_path / "t", tmp_path / "v", server="vllm")
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and served["rank"] == 8 and served["check"] == []
    assert (out - lm(base, tmp_path / "v")).abs().max() < 1e-4


def test_mica_with_dora_and_orthogonal_quantized(base, tmp_path):
    decompose(base, tmp_path / "d", method="mica", rank=4, dora=True, progress=False)
    assert (lm(base, tmp_path / "d" / "adapter") - lm(base)).abs().max() < 1e-5
    train(base, tmp_path / "d" / "adapter", DATA, tmp_path / "t", max_steps=2, lr=1e-2, batch_size=8, progress=False)
    convert(tmp_path / "t", tmp_path / "x", dora="exact", progress=False)
    assert (lm(tmp_path / "x" / "base", tmp_path / "x" / "adapter") - lm(base, tmp_path / "t")).abs().max() < 1e-4
    pytest.importorskip("bitsandbytes")
    s = decompose(base, tmp_path / "q", method="orthogonal", rank=4, quantize="nf4", progress=False)
    manifest = json.loads((tmp_path / "q" / "ailora.json").read_text())
    assert manifest["no_offset"] and s["quant_error"]["orthogonal"]["max"] < 0.2
    decompose(base, tmp_path / "o", method="orthogonal", rank=4, progress=False)
    kept, drawn = read_adapter(tmp_path / "q" / "adapter").factors, read_adapter(tmp_path / "o" / "adapter").factors
    assert all(torch.equal(kept[m][i], drawn[m][i]) for m in drawn for i in (0, 1))  # quantised once, no refit


@pytest.mark.parametrize("method", ["olora", "mica", "orthogonal"])
def test_get_ailora_model_as_decompose(tiny, tmp_path, method):
    src = tiny("llama")
    decompose(src, tmp_path / "d", method=method, rank=4, alpha=8, progress=False)
    written = read_adapter(tmp_path / "d" / "adapter")
    model = get_ailora_model(load(src, "llama"), method=method, rank=4, alpha=8, progress=False)
    state = model.state_dict()
    for m, (A, B) in written.factors.items():
        assert torch.equal(state[f"base_model.model.{m}.lora_A.default.weight"], A)
        assert torch.equal(state[f"base_model.model.{m}.lora_B.default.weight"], B)
    frozen = {n for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    assert bool(frozen) == (method == "mica") and all("lora_B" in n for n in frozen)
    torch.testing.assert_close(logits(model, "llama"), logits(load(src, "llama"), "llama"), atol=1e-5, rtol=0)


def test_peft_olora_pair_converts_with_initial(tiny, tmp_path):
    src = tiny("llama")
    model = peft_model(src, "llama", "olora")
    model.save_pretrained(tmp_path / "init")  # init_lora_weights "olora": applies to PEFT's residual
    ours, theirs = peft_converted_pair(model, tmp_path)
    assert ours.config["r"] == theirs.config["r"] == 8 and ours.config["init_lora_weights"] is True
    for m in theirs.factors:
        torch.testing.assert_close(ours.delta(m), theirs.delta(m), atol=1e-6, rtol=0)
    res = cli("convert", "--trained", tmp_path / "trained", "--for", "vllm", "-o", tmp_path / "v")
    one_line_error(res, "init_lora_weights is 'olora'", "--initial")


def test_peft_mica_adapter_serves_as_it_is(tiny, tmp_path):
    src = tiny("llama")
    model = peft_model(src, "llama", "mica")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "trained")  # init_lora_weights "mica": a LoRA on the original
    s = convert(tmp_path / "trained", tmp_path / "v", server="vllm")
    assert (
        s["check"] == []
        and json.loads((tmp_path / "v" / "adapter_config.json").read_text())["init_lora_weights"] is True
    )
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(load(src, "llama"), tmp_path / "v"), "llama"),
        logits(model, "llama"),
        atol=1e-5,
        rtol=0,
    )


def test_odd_rank_refused_for_orthogonal(tiny, base, tmp_path):
    res = cli("decompose", tiny("llama"), "-o", tmp_path / "o", "--method", "orthogonal", "--rank", "3")
    one_line_error(res, "--rank 3", "even rank")
    assert not (tmp_path / "o").exists()
    res = cli("compare", base, "--data", DATA, "-o", tmp_path / "c", "--methods", "lora,orthogonal", "--rank", "3")
    one_line_error(res, "--rank 3", "even rank")
    assert not (tmp_path / "c").exists()


def test_compare_rows(base, tmp_path):
    s = compare_briefly(base, DATA, tmp_path / "c", ["olora", "mica", "orthogonal"])
    rows = {r["run"]: r for r in s["runs"]}
    assert sorted(rows) == ["mica", "olora", "orthogonal"]
    assert all(r["steps"] == 2 and r["first_loss"] > 0 for r in rows.values())
