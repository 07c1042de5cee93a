"""decompose --method lora-da end to end: decompose → train → convert → merge with logits parity, the same
outputs for the same seed and data, another adapter for other data, and bad input refused in one line."""

import json
import shutil

import pytest
from helpers import build_model, cli, train_dec

from ailora_tools.adapters.conversion import convert
from ailora_tools.adapters.merging import merge
from ailora_tools.decomposition import decompose
from ailora_tools.demo import build_tiny_model, data_file

DATA = data_file("demo_train.jsonl")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("da") / "base")


from helpers import lm_logits as logits  # noqa: E402


def test_lora_da_end_to_end_with_parity(base, tmp_path):
    s = decompose(base, tmp_path / "d", method="lora-da", rank=4, data=DATA, samples=16, max_length=64, progress=False)
    manifest = json.loads((tmp_path / "d" / "ailora.json").read_text())
    assert manifest["method"] == "lora-da" and manifest["data"]["samples"] == 16
    assert manifest["data"]["digest"].startswith("blake3:")
    stats = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert stats["gradient_norm"] > 0 and stats["eigenvalue_edge"] <= stats["eigenvalue_next"]
    assert s["worst_recon_rel_fro"] < 1e-6  # residual + initial adapter = the original model
    assert (logits(tmp_path / "d" / "residual", tmp_path / "d" / "adapter") - logits(base)).abs().max() < 1e-4
    train_dec(tmp_path / "d", DATA, tmp_path / "t", max_steps=3, lr=1e-2, batch_size=8)
    convert(tmp_path / "t", tmp_path / "l")
    merge(base, tmp_path / "l", tmp_path / "m", progress=False)
    trained = logits(tmp_path / "d" / "residual", tmp_path / "t")
    assert (trained - logits(base)).abs().max() > 1e-3  # training moved the model
    assert (trained - logits(base, tmp_path / "l")).abs().max() < 1e-4
    assert (trained - logits(tmp_path / "m")).abs().max() < 1e-4


def test_same_data_same_bytes_other_data_other_adapter(base, tmp_path):
    for name, data in (("a", DATA), ("b", DATA), ("c", data_file("demo_eval.jsonl"))):
        decompose(base, tmp_path / name, method="lora-da", rank=4, data=data, samples=8, max_length=64, progress=False)
    read = lambda d, f: (tmp_path / d / f).read_bytes()  # noqa: E731
    for f in ("adapter/adapter_model.safetensors", "residual/model-00001-of-00007.safetensors"):
        assert read("a", f) == read("b", f)
    assert read("a", "adapter/adapter_model.safetensors") != read("c", "adapter/adapter_model.safetensors")


def test_qwen2_with_biases(tmp_path):
    qwen = build_model("qwen2", tmp_path / "qwen2")
    tok_src = build_tiny_model(tmp_path / "tok")
    for f in tok_src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, qwen / f.name)
    res = cli(
        "decompose",
        qwen,
        "-o",
        tmp_path / "d",
        *"--method lora-da --rank 4 --data".split(),
        DATA,
        *"--samples 8 --max-length 64 --json".split(),
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["worst_recon_rel_fro"] < 1e-6


def test_bad_input_is_one_line(base, tmp_path):
    def refused(*args, needle, model=base):
        res = cli("decompose", model, "-o", tmp_path / "o", "--method", "lora-da", *args)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and needle in res.output, res.output
        assert not (tmp_path / "o").exists()
        return res

    refused(needle="needs calibration samples; pass --data")
    (tmp_path / "empty.jsonl").write_text("")
    refused("--data", tmp_path / "empty.jsonl", needle="no examples")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    refused("--data", tmp_path / "bad.jsonl", needle="bad.jsonl:2")
    refused("--data", DATA, "--samples", "100000", needle="fewer than --samples 100000")
    refused("--data", DATA, "--samples", "4", "--max-length", "5", needle="more than --max-length 5")
    res = cli("decompose", base, "-o", tmp_path / "o", "--data", DATA)
    assert res.exit_code == 1 and "only lora-da, corda, lora-ga, eva do" in res.output
    gpt2 = build_model("gpt2", tmp_path / "gpt2")
    shutil.copy(base / "tokenizer.json", gpt2 / "tokenizer.json")
    shutil.copy(base / "tokenizer_config.json", gpt2 / "tokenizer_config.json")
    res = refused("--data", DATA, *"--samples 4 --targets c_attn".split(), model=gpt2, needle="'gpt2' is not supported")
    assert "bert" in res.output, res.output
    res = cli("decompose", base, "-o", tmp_path / "o", "--method", "pissa", "--text-column", "body")
    assert res.exit_code == 1 and "--task and the column options: for calibration data" in res.output, res.output
    refused("--data", DATA, *"--samples 4 --task masked-lm".split(), needle="not for --task masked-lm")


@pytest.mark.parametrize("masking", ["5.3", "4.52"])
def test_transformers_too_old_for_calibration_is_one_line(base, tmp_path, monkeypatch, masking):
    """transformers 5.3's mask functions still require cache_position, and 4.52 has no masking_utils at all: LoRA-DA
    says which transformers it needs and which is installed, before calibrating or writing anything."""
    import transformers

    from ailora_tools.init.lora_da import calibration, masks

    def before_5_4(config, inputs_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
        raise AssertionError("not to be called")

    old = None if masking == "4.52" else before_5_4
    monkeypatch.setattr(masks, "create_causal_mask", old)
    monkeypatch.setattr(masks, "create_sliding_window_causal_mask", old)
    monkeypatch.setattr(transformers, "__version__", f"{masking}.0")
    res = cli("decompose", base, "-o", tmp_path / "o", "--method", "lora-da", "--data", DATA, "--samples", "4")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(
        f"error: LoRA-DA calibration needs transformers >= 5.4 (its masking API); transformers {masking}.0 is installed"
    ), res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(calibration.UnsupportedError, match=r"needs transformers >= 5\.4"):
        calibration.calibrate(base, [], ["model.layers.0.self_attn.q_proj"], device="cpu", progress=False)
