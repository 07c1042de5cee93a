"""`get_ailora_model`: the same factors and residuals as decompose, logits unchanged at step 0, a transformers
Trainer run, and saved adapters that PEFT reloads (converted to the original base, or on a rebuilt residual)."""

from pathlib import Path

import pytest
import torch
from helpers import logits, make_config
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from ailora_tools import convert, decompose, get_ailora_model
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import NumericsError, OptionError, TargetError, UnsupportedError
from ailora_tools.io.examples import collate, load_jsonl
from ailora_tools.io.peft_adapter import read_adapter


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize(
    "kind,method,dtype,svd",
    [
        ("llama", "ailora", torch.float32, "randomized"),
        ("llama", "pissa", torch.float32, "exact"),
        ("llama", "milora", torch.float32, "randomized"),
        ("llama", "lora", torch.float32, "randomized"),
        ("llama", "ailora", torch.bfloat16, "exact"),
        ("gpt2", "pissa", torch.float32, "randomized"),
    ],
)
def test_same_factors_and_residual_as_decompose(tiny, tmp_path, kind, method, dtype, svd):
    src = tiny(kind, dtype)
    opts = dict(
        method=method,
        rank=4,
        alpha=8,
        seed=3,
        svd=svd,
        device="cpu",
        targets=["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"],
    )
    decompose(src, tmp_path / "dec", progress=False, **opts)
    written = read_adapter(tmp_path / "dec" / "adapter")
    original = tensors(src)
    ref = logits(load(src, dtype), kind)
    model = get_ailora_model(load(src, dtype), progress=False, **opts)
    state = model.state_dict()
    for m, (A, B) in written.factors.items():  # bit for bit
        assert torch.equal(state[f"base_model.model.{m}.lora_A.default.weight"], A)
        assert torch.equal(state[f"base_model.model.{m}.lora_B.default.weight"], B)
    base = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k
    }
    residual = tensors(tmp_path / "dec" / "residual") if method != "lora" else original
    assert set(original) <= set(base) and set(base) - set(original) <= {"lm_head.weight"}  # tied in GPT-2
    for name in original:
        assert torch.equal(base[name], residual[name]), name
        changed = method != "lora" and name.removesuffix(".weight") in written.factors
        assert torch.equal(base[name], original[name]) != changed, name
    got = logits(model, kind)
    base_dir = tmp_path / "dec" / "residual" if method != "lora" else src
    from_files = logits(PeftModel.from_pretrained(load(base_dir, dtype), tmp_path / "dec" / "adapter"), kind)
    torch.testing.assert_close(got, from_files, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    limit = 1e-4 if dtype == torch.float32 else 0.01 * float(ref.abs().max())
    assert float((got.float() - ref.float()).abs().max()) <= limit  # unchanged at step 0
    model.save_pretrained(tmp_path / "saved")
    saved = read_adapter(tmp_path / "saved")
    for key in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out"):
        assert saved.config[key] == written.config[key], key
    assert sorted(saved.config["target_modules"]) == written.config["target_modules"]
    assert all(torch.equal(saved.factors[m][i], written.factors[m][i]) for m in written.factors for i in (0, 1))


@pytest.mark.slow
def test_trainer_run_saves_and_reloads(tmp_path):
    base = build_tiny_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    train, evals = (load_jsonl(data_file(f), tok, max_length=64) for f in ("demo_train.jsonl", "demo_eval.jsonl"))
    opts = dict(method="ailora", rank=8, seed=0, device="cpu", progress=False)
    model = get_ailora_model(load(base), **opts)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    model.save_pretrained(tmp_path / "init")  # the initial adapter, kept for conversion later
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=20,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=lambda batch: collate(batch, tok.pad_token_id),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the residual stayed
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model.eval()
    ids = tok(["Q: 12 + 30 = ?\nA: 42", "Q: 7 - 9 = ?\nA: -2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = model(**ids).logits
        # PEFT's own conversion: a rank-2r LoRA on the ORIGINAL base
        on_original = PeftModel.from_pretrained(load(base), tmp_path / "lora")(**ids).logits
        # the same with ailora-tools convert
        convert(tmp_path / "trained", tmp_path / "ours", initial=tmp_path / "init")
        ours = PeftModel.from_pretrained(load(base), tmp_path / "ours")(**ids).logits
        # or rebuild the residual (deterministic for the seed) and load the trained adapter on it
        residual = get_ailora_model(load(base), **opts).unload()
        rebuilt = PeftModel.from_pretrained(residual, tmp_path / "trained")(**ids).logits
    assert read_adapter(tmp_path / "lora").config["r"] == 16
    torch.testing.assert_close(on_original, trained, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, trained, rtol=0, atol=1e-4)
    torch.testing.assert_close(rebuilt, trained, rtol=0, atol=1e-5)


def test_bad_input(tiny):
    model = load(tiny("llama"))
    with pytest.raises(OptionError, match=r"method 'dora': choose one of ailora, pissa, milora, lora"):
        get_ailora_model(model, method="dora")
    with pytest.raises(NumericsError, match=r"rank=32: model.layers.0.self_attn.v_proj.weight is 32x64"):
        get_ailora_model(model, rank=32, progress=False)
    with pytest.raises(TargetError, match=r"'q_proj' is part of the fused c_attn"):  # the default targets
        get_ailora_model(load(tiny("gpt2")), rank=4)
    tied = LlamaForCausalLM(
        make_config("llama").__class__(**{**make_config("llama").to_dict(), "tie_word_embeddings": True})
    )
    with pytest.raises(UnsupportedError, match=r"lm_head.weight is tied to model.embed_tokens.weight"):
        get_ailora_model(tied, method="pissa", targets=["lm_head"], rank=4)
    model.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(
        torch.zeros(64, 64, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(UnsupportedError, match=r"q_proj.weight has dtype torch.int8"):
        get_ailora_model(model, rank=4)
    assert not isinstance(model, PeftModel) and not hasattr(model, "peft_config")  # nothing wrapped on failure
