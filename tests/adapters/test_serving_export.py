"""`convert --for vllm|llama.cpp`: exports every server takes as they are, refusals with what to
do, and `check` naming the exact command that fixes each finding."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from helpers import cli, load, logits
from helpers.adapters import fake_training, randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ailora_tools import convert, decompose, export_gguf
from ailora_tools.adapters.check import VLLM_MAX_LORA_RANKS, check_adapter
from ailora_tools.adapters.serving import export_for
from ailora_tools.errors import (
    NumericsError,
    OptionError,
    TargetError,
    UnsupportedError,
)
from ailora_tools.io.peft_adapter import read_adapter, write_adapter

#: PEFT logits of the export against the adapter it came from (float32 tiny Llama, logits of order 1)
PARITY = 1e-5


def peft_logits(src: Path, adapter: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(load(src, "llama"), adapter), "llama")


def plain_lora(src: Path, out: Path, *, r: int, alpha: float, seed: int = 0, **kw) -> Path:
    """A PEFT LoRA as PEFT saves it, with random non-zero B (as after training)."""
    model = get_peft_model(
        load(src, "llama"), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], **kw)
    )
    randomize_lora(model, seed=seed, scale=0.1).save_pretrained(out)
    return out


def config(d: Path) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


def assert_served(cfg: dict, rank: int):
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["init_lora_weights"] is True
    assert not cfg["modules_to_save"] and cfg["bias"] == "none" and not cfg["use_dora"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """An rsLoRA AILoRA adapter of rank 3 trained (seeded noise) on the residual, and its plain convert (rank 6)."""
    src, root = Path(tiny("llama")), tmp_path_factory.mktemp("served")
    decompose(src, root / "dec", rank=3, alpha=8, rslora=True, progress=False)
    fake_training(root / "dec" / "adapter", root / "trained")
    convert(root / "trained", root / "lora")
    return src, root


def test_for_vllm_from_a_trained_adapter_bakes_the_scale_and_pads_the_rank(trained, tmp_path):
    src, root = trained
    res = cli("convert", "--trained", root / "trained", "--for", "vllm", "-o", tmp_path / "v", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert_served(config(tmp_path / "v"), 8)  # rank 2r = 6 padded to 8, the next rank vLLM accepts
    assert summary["ranks_before"] == [6] and len(summary["padded_modules"]) == 4 and summary["check"] == []
    assert summary["vllm_max_lora_rank"] == 8 and "--max-lora-rank 8" in summary["serve_command"]
    expected = peft_logits(src, root / "lora")
    assert (peft_logits(src, tmp_path / "v") - expected).abs().max() <= PARITY
    residual = logits(PeftModel.from_pretrained(load(root / "dec" / "residual", "llama"), root / "trained"), "llama")
    assert (expected - residual).abs().max() <= 1e-4  # and that is the model as trained
    # the same rules on the converted LoRA (already on the original model): the same adapter
    res = cli("convert", "--trained", root / "lora", "--for", "vllm", "-o", tmp_path / "v2")
    assert res.exit_code == 0 and "vLLM check: passed" in res.output and "vllm serve" in res.output, res.output
    a, b = read_adapter(tmp_path / "v"), read_adapter(tmp_path / "v2")
    for m in a.factors:
        torch.testing.assert_close(
            a.factors[m][1] @ a.factors[m][0], b.factors[m][1] @ b.factors[m][0], atol=1e-6, rtol=0
        )


def test_for_vllm_on_a_plain_peft_lora_with_rslora_and_patterns(tiny, tmp_path):
    src = Path(tiny("llama"))
    lora = plain_lora(
        src, tmp_path / "peft", r=5, alpha=7, use_rslora=True, rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 2.0}
    )
    found = check_adapter(lora, target="vllm", max_lora_rank=8)
    assert [f.rule for f in found] == ["patterns"]
    command = found[0].fix.split("`")[1]
    assert command == f"ailora-tools convert --trained {lora} --for vllm -o LORA"
    res = cli(*shlex.split(command.replace("LORA", str(tmp_path / "fixed")))[1:])  # the fix as check says it
    assert res.exit_code == 0, res.output
    assert_served(config(tmp_path / "fixed"), 8)
    assert check_adapter(tmp_path / "fixed", target="vllm", max_lora_rank=8) == []
    assert (peft_logits(src, tmp_path / "fixed") - peft_logits(src, lora)).abs().max() <= PARITY
    res = cli("push", tmp_path / "fixed", "--repo-id", "me/x", "--dry-run")  # a model card from its manifest
    assert res.exit_code == 0 and "converted to a standard LoRA" in res.output, res.output


def test_above_the_server_limit_each_module_is_recompressed_with_its_error(tiny, tmp_path):
    src = Path(tiny("llama"))
    lora = plain_lora(src, tmp_path / "r20", r=20, alpha=20)
    found = check_adapter(lora, target="vllm", max_lora_rank=16)
    assert [f.rule for f in found] == ["rank"]
    assert f"ailora-tools convert --trained {lora} --for vllm --max-lora-rank 16 -o LORA" in found[0].fix
    summary = export_for(lora, tmp_path / "v16", server="vllm", max_lora_rank=16)
    assert_served(config(tmp_path / "v16"), 16)
    before, after = read_adapter(lora), read_adapter(tmp_path / "v16")
    for m, err in summary["recompressed"].items():  # Eckart–Young: the error of the best rank-16 approximation
        delta = before.delta(m).double()
        S = torch.linalg.svdvals(delta)
        assert err == pytest.approx(float(S[16:].norm() / S.norm()), rel=1e-6) and err > 0
        got = after.delta(m).double()
        assert float((got - delta).norm() / delta.norm()) == pytest.approx(err, rel=1e-4)
    assert summary["serving_worst_rel_fro_error"] == max(summary["recompressed"].values())
    with pytest.raises(NumericsError, match="--tolerance"):
        export_for(lora, tmp_path / "tight", server="vllm", max_lora_rank=16, tolerance=1e-6)
    assert not (tmp_path / "tight").exists()
    with pytest.raises(OptionError, match="vLLM accepts 1, 8, 16"):
        export_for(lora, tmp_path / "odd", server="vllm", max_lora_rank=24)


def test_above_512_recompresses_to_512(tiny, tmp_path):
    src = Path(tiny("llama"))
    lora = plain_lora(src, tmp_path / "r600", r=600, alpha=600)
    summary = export_for(lora, tmp_path / "v", server="vllm")
    # above 512 every module is re-compressed; a rank-600 product of 64-wide matrices has rank ≤ 64, so the QR+SVD
    # keeps no more than that, exactly
    assert_served(config(tmp_path / "v"), 64)
    assert summary["vllm_max_lora_rank"] == 64 and sorted(summary["recompressed"]) == sorted(read_adapter(lora).factors)
    assert summary["serving_worst_rel_fro_error"] < 1e-6
    assert (peft_logits(src, tmp_path / "v") - peft_logits(src, lora)).abs().max() <= 1e-4


def test_for_llama_cpp_one_alpha_every_scale_baked(trained, tiny, tmp_path):
    src, root = trained
    res = cli("convert", "--trained", root / "trained", "--for", "llama.cpp", "-o", tmp_path / "l")
    assert res.exit_code == 0 and "llama.cpp check: passed" in res.output and "export-gguf" in res.output, res.output
    assert_served(config(tmp_path / "l"), 6)  # llama.cpp takes any rank: one for every module, alpha = r
    assert (peft_logits(src, tmp_path / "l") - peft_logits(src, root / "lora")).abs().max() <= PARITY
    export_gguf(tmp_path / "l", src, tmp_path / "l.gguf")
    reader = GGUFReader(tmp_path / "l.gguf")
    assert float(reader.fields["adapter.lora.alpha"].contents()) == 6.0
    # per-module scales (alpha_pattern) baked: llama.cpp's single alpha / r is right for every module
    lora = plain_lora(src, tmp_path / "pat", r=4, alpha=4, alpha_pattern={"v_proj": 12.0})
    export_for(lora, tmp_path / "l2", server="llama.cpp", base=src)
    assert_served(config(tmp_path / "l2"), 4)
    assert (peft_logits(src, tmp_path / "l2") - peft_logits(src, lora)).abs().max() <= PARITY
    with pytest.raises(OptionError, match="--max-lora-rank is the vLLM server's"):
        export_for(lora, tmp_path / "l3", server="llama.cpp", max_lora_rank=16)


def refused(res, *needles):
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    for n in needles:
        assert n in res.output, res.output


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save has ['lm_head']", "ailora-tools merge BASE"]),
        ({"modules_to_save": ["score"]}, ["modules_to_save has ['score']", "serve the adapter without them"]),
        ({"bias": "all"}, ["bias is 'all'", "merge_and_unload"]),
        ({"use_dora": True}, ["use_dora is true", "ailora-tools merge", "--dora exact"]),
    ],
)
def test_what_no_lora_carries_is_refused_with_what_to_do(trained, tmp_path, change, needles):
    _, root = trained
    ad = read_adapter(root / "lora")
    write_adapter(tmp_path / "bad", {**ad.config, **change}, ad.factors)
    for server in ("vllm", "llama.cpp"):
        refused(cli("convert", "--trained", tmp_path / "bad", "--for", server, "-o", tmp_path / "out"), *needles)
        assert not (tmp_path / "out").exists()


def test_a_tensor_that_is_no_lora_factor_is_refused_not_dropped(trained, tmp_path):
    _, root = trained
    ad = read_adapter(root / "lora")
    write_adapter(tmp_path / "emb", ad.config, ad.factors)
    weights = tmp_path / "emb" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 128)
    save_file(tensors, weights)
    refused(
        cli("convert", "--trained", tmp_path / "emb", "--for", "vllm", "-o", tmp_path / "out"),
        "lora_embedding_A' is not a LoRA A/B weight",
    )
    assert not (tmp_path / "out").exists()


def test_a_trained_head_is_refused_not_dropped(trained, tmp_path):
    _, root = trained
    ad = read_adapter(root / "trained")
    head = {"lm_head.weight": torch.zeros(128, 64)}
    write_adapter(tmp_path / "t", {**ad.config, "modules_to_save": ["lm_head"]}, ad.factors, extra=head)
    (tmp_path / "t" / "ailora-train.json").write_text(json.dumps({"initial_adapter": str(root / "dec" / "adapter")}))
    residual = re.escape(str(root / "dec" / "residual"))  # the fix names the base the adapter was trained on
    with pytest.raises(UnsupportedError, match=rf"modules_to_save has \['lm_head'\].*ailora-tools merge {residual} "):
        convert(tmp_path / "t", tmp_path / "out", server="vllm")
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "t", tmp_path / "plain")  # without --for the head is kept, as before
    assert read_adapter(tmp_path / "plain").extra.keys() == head.keys()


def test_modules_and_architectures_a_server_lacks_are_refused(tiny, tmp_path):
    decompose(tiny("bert"), tmp_path / "dec", rank=4, method="lora", progress=False)
    bert = tmp_path / "dec" / "adapter"
    refused(
        cli("convert", "--trained", bert, "--for", "vllm", "-o", tmp_path / "v"),
        "vLLM does not serve LoRA on ['query', 'value']",
        f"ailora-tools merge {tiny('bert')} {bert} -o MERGED",
    )
    refused(
        cli("convert", "--trained", bert, "--for", "llama.cpp", "--base", tiny("bert"), "-o", tmp_path / "l"),
        "architecture 'bert' is not supported",
        f"ailora-tools merge {tiny('bert')} {bert} -o MERGED",
    )
    assert not (tmp_path / "v").exists() and not (tmp_path / "l").exists()
    llama = read_adapter(plain_lora(Path(tiny("llama")), tmp_path / "hub", r=4, alpha=4))
    write_adapter(
        tmp_path / "hub-id", {**llama.config, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, llama.factors
    )  # a base that is no local directory: llama.cpp's rules need its config.json
    refused(
        cli("convert", "--trained", tmp_path / "hub-id", "--for", "llama.cpp", "-o", tmp_path / "h"),
        "no base model config.json at meta-llama/Llama-3.1-8B",
        "pass --base DIR",
    )


def test_adapters_for_a_residual_are_sent_to_convert(trained, tmp_path):
    src, root = trained
    with pytest.raises(TargetError, match="applies to decompose's residual"):
        export_for(root / "dec" / "adapter", tmp_path / "a", server="vllm")
    ad = read_adapter(root / "lora")
    write_adapter(tmp_path / "pissa", {**ad.config, "init_lora_weights": "pissa"}, ad.factors)
    refused(
        cli("convert", "--trained", tmp_path / "pissa", "--for", "vllm", "-o", tmp_path / "b"),
        "init_lora_weights is 'pissa'",
        "--initial INITIAL --for vllm",
    )
    found = check_adapter(root / "trained", target="llama.cpp", base=src)
    assert (
        found[0].rule == "base" and f"ailora-tools convert --trained {root / 'trained'} --for llama.cpp" in found[0].fix
    )


def test_allowed_ranks_are_the_servers():
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
