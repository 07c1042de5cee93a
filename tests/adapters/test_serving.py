"""Serving and publishing: GGUF export, vLLM/llama.cpp/PEFT checks, push."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from helpers.adapters import fake_training

from ailora_tools import convert, decompose
from ailora_tools.adapters.check import check_adapter
from ailora_tools.adapters.gguf_export import export_gguf, permute_rows
from ailora_tools.cli import main
from ailora_tools.io.peft_adapter import read_adapter, write_adapter
from ailora_tools.io.tensorio import read_header, read_tensor


@pytest.fixture(params=["llama", "qwen2"])
def converted(request, tiny, tmp_path):
    kind = request.param
    src = Path(tiny(kind))
    decompose(src, tmp_path / "dec", rank=4, alpha=8, rslora=True, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained")
    convert(tmp_path / "trained", tmp_path / "lora")
    return kind, src, tmp_path


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def base_weight(src: Path, name: str) -> torch.Tensor:
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    return read_tensor(read_header(src / index[name]), name).double()


@pytest.mark.parametrize("outtype,dtype", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16")])
def test_gguf_reads_back(converted, outtype, dtype):
    kind, src, tmp = converted
    summary = export_gguf(tmp / "lora", src, tmp / "a.gguf", outtype=outtype)
    reader = GGUFReader(tmp / "a.gguf")
    assert field(reader, "general.architecture") == {"llama": "llama", "qwen2": "qwen2"}[kind]
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    lora = read_adapter(tmp / "lora")
    r = lora.config["r"]
    # rsLoRA: PEFT's scale is alpha/sqrt(r); llama.cpp computes alpha/r, so alpha is written as s·r
    assert field(reader, "adapter.lora.alpha") == pytest.approx(lora.scale("model.layers.0.self_attn.q_proj") * r)
    names = {t.name: t for t in reader.tensors}
    assert sorted(names) == sorted(f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qv" for ab in "ab")
    for t in reader.tensors:
        assert t.tensor_type.name == dtype
    a, b = names["blk.0.attn_v.weight.lora_a"], names["blk.0.attn_v.weight.lora_b"]
    assert tuple(int(x) for x in a.shape) == (64, r) and tuple(int(x) for x in b.shape) == (r, 32)  # ne order
    assert summary["tensors"] == 8


def test_permutation_matches_llama_cpp(converted):
    """permute(W) + (alpha/r)·B'A' == permute(W + s·B·A) for q_proj and k_proj-like rows."""
    kind, src, tmp = converted
    export_gguf(tmp / "lora", src, tmp / "a.gguf")
    reader = GGUFReader(tmp / "a.gguf")
    alpha = field(reader, "adapter.lora.alpha")
    t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float32)).double() for x in reader.tensors}
    lora = read_adapter(tmp / "lora")
    cfg = json.loads((src / "config.json").read_text())
    for layer in range(2):
        module = f"model.layers.{layer}.self_attn.q_proj"
        W = base_weight(src, module + ".weight")
        merged = W + lora.delta(module).double()
        A, B = t[f"blk.{layer}.attn_q.weight.lora_a"], t[f"blk.{layer}.attn_q.weight.lora_b"]
        r = A.shape[0]
        if kind == "llama":
            W, merged = permute_rows(W, cfg["num_attention_heads"]), permute_rows(merged, cfg["num_attention_heads"])
        torch.testing.assert_close(W + alpha / r * B @ A, merged, atol=1e-5, rtol=0)
    # the permutation itself: llama.cpp's head-interleave, checked on a labelled matrix
    rows = torch.arange(8.0)[:, None]
    assert permute_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_k_proj_uses_kv_heads(tiny, tmp_path):
    src = Path(tiny("llama"))
    decompose(src, tmp_path / "dec", method="pissa", targets=["k_proj"], rank=4, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained")
    convert(tmp_path / "trained", tmp_path / "lora")
    export_gguf(tmp_path / "lora", src, tmp_path / "k.gguf")
    reader = GGUFReader(tmp_path / "k.gguf")
    t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float32)).double() for x in reader.tensors}
    alpha = field(reader, "adapter.lora.alpha")
    lora = read_adapter(tmp_path / "lora")
    module = "model.layers.1.self_attn.k_proj"
    A, B = t["blk.1.attn_k.weight.lora_a"], t["blk.1.attn_k.weight.lora_b"]
    W = base_weight(src, module + ".weight")
    expected = permute_rows(W + lora.delta(module).double(), 4, 2)
    torch.testing.assert_close(permute_rows(W, 4, 2) + alpha / A.shape[0] * B @ A, expected, atol=1e-5, rtol=0)


def test_q8_0_where_rows_allow_and_says_where_not(converted):
    kind, src, tmp = converted
    summary = export_gguf(tmp / "lora", src, tmp / "q.gguf", outtype="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp / "q.gguf").tensors}
    assert all(types[n] == "Q8_0" for n in types if n.endswith("lora_a"))  # rows of 64: quantized
    assert all(types[n] == "F16" for n in types if n.endswith("lora_b"))  # rows of r = 8: f16
    assert "multiples of 32" in summary["note"] and len(summary["not_quantized"]) == 4


def test_unsupported_architecture_is_named(tiny, tmp_path):
    decompose(tiny("bert"), tmp_path / "dec", rank=4, method="lora", progress=False)
    code = CliRunner().invoke(
        main,
        ["export-gguf", str(tmp_path / "dec" / "adapter"), "--base", str(tiny("bert")), "-o", str(tmp_path / "b.gguf")],
    )
    assert code.exit_code == 1 and "architecture 'bert' is not supported" in code.output
    assert not (tmp_path / "b.gguf").exists()


def broken(tmp_path, lora: Path, name: str, **changes) -> Path:
    ad = read_adapter(lora)
    d = tmp_path / name
    write_adapter(d, {**ad.config, **changes}, ad.factors)
    return d


def test_check_rules_each_with_its_message(converted):
    kind, src, tmp = converted
    lora = tmp / "lora"
    assert check_adapter(lora, target="vllm", max_lora_rank=8) == []
    assert check_adapter(lora, target="peft") == []
    assert check_adapter(lora, target="llama.cpp", base=src) == []
    cases = {
        "dora": ({"use_dora": True}, "use_dora is true"),
        "bias": ({"bias": "all"}, "bias is 'all'"),
        "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save has ['lm_head']"),
        "init_lora_weights": ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'"),
        "patterns": ({"rank_pattern": {"q_proj": 4}}, "rank_pattern / alpha_pattern are set"),
    }
    for rule, (change, message) in cases.items():
        found = check_adapter(broken(tmp, lora, rule, **change), target="vllm", max_lora_rank=8)
        assert [f.rule for f in found] == [rule] and message in found[0].message and found[0].fix
    rank = check_adapter(lora, target="vllm", max_lora_rank=1)
    assert [f.rule for f in rank] == ["rank"] and "--max-lora-rank 8" in rank[0].fix
    ad = read_adapter(lora)
    odd = tmp / "odd"
    write_adapter(odd, ad.config, {m.replace("q_proj", "attn_qq"): f for m, f in ad.factors.items()})
    assert [f.rule for f in check_adapter(odd, target="vllm", max_lora_rank=8)] == ["modules"]
    res = CliRunner().invoke(main, ["check", str(broken(tmp, lora, "d2", use_dora=True)), "--for", "vllm"])
    assert res.exit_code == 1 and "[dora]" in res.output
    res = CliRunner().invoke(main, ["check", str(lora), "--for", "vllm", "--max-lora-rank", "8"])
    assert res.exit_code == 0 and "passes for vllm" in res.output
    found = check_adapter(lora, target="llama.cpp", base=Path(__file__).parent)  # no config.json there
    assert found and found[0].rule == "base" and "--base DIR" in found[0].fix


def test_convert_runs_the_vllm_check(converted):
    kind, src, tmp = converted
    res = CliRunner().invoke(main, ["convert", "--trained", str(tmp / "trained"), "-o", str(tmp / "l2")])
    assert res.exit_code == 0 and "vLLM check: passed" in res.output


class Recorder:
    """Stands in for huggingface_hub.HfApi: records calls and what would be uploaded."""

    calls: list = []

    def __init__(self, token=None):
        Recorder.calls.append(("init", {"token_given": token is not None}))

    def create_repo(self, repo_id, **kw):
        Recorder.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, **kw):
        import fnmatch

        files = sorted(
            str(p.relative_to(folder_path))
            for p in Path(folder_path).rglob("*")
            if p.is_file()
            and not any(fnmatch.fnmatch(str(p.relative_to(folder_path)), pat) for pat in kw["ignore_patterns"])
        )
        Recorder.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kw}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_records_calls_card_and_hides_token(converted, monkeypatch):
    kind, src, tmp = converted
    secret = "hf_SECRET_TOKEN_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr("ailora_tools.adapters.hub.HfApi", Recorder)
    Recorder.calls = []
    dry = CliRunner().invoke(main, ["push", str(tmp / "lora"), "--repo-id", "me/tiny-ailora", "--dry-run"])
    assert dry.exit_code == 0 and Recorder.calls == [] and not (tmp / "lora" / "README.md").exists()
    assert "adapter_model.safetensors" in dry.output and "base_model:" in dry.output
    res = CliRunner().invoke(
        main, ["push", str(tmp / "lora"), "--repo-id", "me/tiny-ailora", "--private", "--commit-message", "first"]
    )
    assert res.exit_code == 0, res.output
    assert secret not in res.output and secret not in dry.output
    kinds = [c[0] for c in Recorder.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    create, upload = Recorder.calls[1][1], Recorder.calls[2][1]
    assert create == {"repo_id": "me/tiny-ailora", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["commit_message"] == "first" and upload["repo_id"] == "me/tiny-ailora"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "ailora-convert.json"]
    card = (tmp / "lora" / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {src}" in front and "library_name: peft" in front
    assert "- ailora" in front and "- lora" in front
    assert "vllm serve" in card and "PeftModel.from_pretrained" in card and "llama-cli" in card
