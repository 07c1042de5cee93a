"""AILoRA on fused Q/K/V matrices (Phi-3, GPT-NeoX, GPT-2's Conv1D, ModernBERT), targets as users write them
(`all-linear`, part of a fused matrix), and the default roles of the modules the AILoRA paper does not name."""

import json

import pytest
import torch
from helpers import train_args
from helpers.zoo import ZOO, build, logits

from ailora_tools import decompose, get_ailora_model
from ailora_tools.errors import NumericsError, TargetError
from ailora_tools.init.fused import split_ranks
from ailora_tools.io.peft_adapter import read_adapter
from ailora_tools.io.tensorio import load_tensors

FUSED = {"phi3": "qkv_proj", "gpt_neox": "query_key_value", "gpt2": "c_attn", "modernbert": "Wqkv"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def weights(src) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_tensors(f))
    return out


def rows(ranges) -> torch.Tensor:
    return torch.cat([torch.arange(b, e) for b, e in ranges])


@pytest.mark.parametrize("kind", list(FUSED))
def test_fused_qkv_blocks_are_the_roles_svd_products(models, tmp_path, kind):
    src, rank = models(kind), 6
    decompose(src, tmp_path / "dec", targets=[FUSED[kind]], rank=rank, alpha=12, svd="exact", progress=False)
    assert (
        logits(kind, tmp_path / "dec" / "residual", tmp_path / "dec" / "adapter") - logits(kind, src)
    ).abs().max() <= 1e-5  # step 0 is the original model
    manifest = json.loads((tmp_path / "dec" / "ailora.json").read_text())
    adapter, W = read_adapter(tmp_path / "dec" / "adapter"), weights(src)
    r_q, r_v = split_ranks(rank)
    assert (r_q, r_v) == (3, 3) and set(manifest["roles"].values()) == {"principal+minor"}
    for module, (A, B) in adapter.factors.items():
        stats = manifest["modules"][module]
        fused = stats["fused"]
        assert fused["rank"] == {"q": r_q, "v": r_v} and fused["columns"] == {"q": [0, r_q], "v": [r_q, rank]}
        w = W[stats["tensor"]].double()
        w = w.T if kind == "gpt2" else w  # Conv1D stores [in, out]
        product = adapter.scale(module) * B.double() @ A.double()
        q, k, v = (rows(fused["rows"][p]) for p in "qkv")
        assert len(q) + len(k) + len(v) == w.shape[0] and len(set(torch.cat([q, k, v]).tolist())) == w.shape[0]
        U, S, Vh = torch.linalg.svd(w[q], full_matrices=False)
        torch.testing.assert_close(product[q], U[:, :r_q] @ torch.diag(S[:r_q]) @ Vh[:r_q], atol=1e-5, rtol=0)
        U, S, Vh = torch.linalg.svd(w[v], full_matrices=False)
        torch.testing.assert_close(product[v], U[:, -r_v:] @ torch.diag(S[-r_v:]) @ Vh[-r_v:], atol=1e-5, rtol=0)
        assert product[k].abs().max() == 0 and B[k].abs().max() == 0  # K's rows start untouched
        assert B[q][:, r_q:].abs().max() == 0 and B[v][:, :r_q].abs().max() == 0  # B is block-structured


def test_layouts_follow_the_attention_code():
    """GPT-NeoX interleaves Q, K, V per head; Phi-3 holds Q then the (fewer) KV heads' K and V."""
    from ailora_tools.init.fused import qkv_rows
    from ailora_tools.init.targets import GPT_NEOX, PHI3

    neox = qkv_rows("gpt_neox.layers.0.attention.query_key_value", 48, GPT_NEOX, {"num_attention_heads": 2})
    assert (neox.q, neox.k, neox.v) == (((0, 8), (24, 32)), ((8, 16), (32, 40)), ((16, 24), (40, 48)))
    phi = qkv_rows(
        "model.layers.0.self_attn.qkv_proj",
        128,
        PHI3,
        {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64},
    )
    assert (phi.q, phi.k, phi.v) == (((0, 64),), ((64, 96),), ((96, 128),))


def test_get_ailora_model_gives_decompose_factors_on_a_fused_matrix(models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = models("phi3")
    decompose(src, tmp_path / "dec", targets=["qkv_proj"], rank=4, progress=False)
    model = get_ailora_model(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), targets=["qkv_proj"], rank=4, progress=False
    )
    expected = read_adapter(tmp_path / "dec" / "adapter").factors
    for name, p in model.named_parameters():
        if ".lora_" in name:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            torch.testing.assert_close(p.detach(), expected[module][0 if ".lora_A" in name else 1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kind, target, fused",
    [
        ("phi3", "q_proj", "qkv_proj"),
        ("phi3", "gate_proj", "gate_up_proj"),
        ("gpt_neox", "v_proj", "query_key_value"),
        ("modernbert", "k_proj", "Wqkv"),
        ("modernbert", "up_proj", "Wi"),
    ],
)
def test_part_of_a_fused_matrix_is_refused_naming_it(models, tmp_path, kind, target, fused):
    with pytest.raises(TargetError, match=rf"'{target}' is part of the fused {fused}.*target {fused} instead"):
        decompose(models(kind), tmp_path / "out", targets=[target], rank=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_rank_one_cannot_be_shared_by_q_and_v(models, tmp_path):
    with pytest.raises(NumericsError, match=r"rank 1: .*qkv_proj is a fused Q/K/V matrix"):
        decompose(models("phi3"), tmp_path / "out", targets=["qkv_proj"], rank=1, progress=False)
    decompose(
        models("phi3"), tmp_path / "one", targets=["qkv_proj"], roles={"qkv_proj": "principal"}, rank=1, progress=False
    )  # one role for the whole matrix: any rank
    assert set(json.loads((tmp_path / "one" / "ailora.json").read_text())["roles"].values()) == {"principal"}


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2", "bert"])
def test_all_linear_is_every_linear_layer_but_the_head(models, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    src = models(kind)
    decompose(src, tmp_path / "dec", targets=["all-linear"], rank=2, progress=False)
    roles = json.loads((tmp_path / "dec" / "ailora.json").read_text())["roles"]
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    peft = get_peft_model(auto.from_pretrained(src), LoraConfig(r=2, target_modules="all-linear"))
    ours = {m.removeprefix("bert.") for m in roles}
    theirs = {
        n.removeprefix("base_model.model.").removeprefix("bert.").rsplit(".lora_A", 1)[0]
        for n, _ in peft.named_parameters()
        if ".lora_A." in n
    }
    assert ours == theirs and not any("lm_head" in m or "decoder" in m for m in ours)
    assert (
        logits(kind, tmp_path / "dec" / "residual", tmp_path / "dec" / "adapter") - logits(kind, src)
    ).abs().max() <= 1e-4


def test_ailora_default_roles_and_role_overrides(models, tmp_path):
    decompose(
        models("llama"), tmp_path / "d", targets=["all-linear"], roles={"down_proj": "minor"}, rank=2, progress=False
    )
    roles = {
        m.rsplit(".", 1)[-1]: r for m, r in json.loads((tmp_path / "d" / "ailora.json").read_text())["roles"].items()
    }
    assert roles == {
        "q_proj": "principal",
        "k_proj": "principal",
        "v_proj": "minor",
        "o_proj": "minor",
        "gate_proj": "principal",
        "up_proj": "principal",
        "down_proj": "minor",
    }
    with pytest.raises(TargetError, match="all-linear already names every linear layer; pass it alone"):
        decompose(models("llama"), tmp_path / "x", targets=["all-linear", "q_proj"], progress=False)


def test_zoo_targets_name_whole_matrices():
    assert all(ZOO[k][3] == v for k, v in FUSED.items())


def test_refusals_are_one_line_naming_the_flags(models, tmp_path):
    from helpers import cli, one_line_error

    res = cli("decompose", models("phi3"), "-o", tmp_path / "o", "--targets", "q_proj,v_proj")
    one_line_error(res, "--targets: 'q_proj' is part of the fused qkv_proj", "target qkv_proj instead")
    res = cli("decompose", models("phi3"), "-o", tmp_path / "o", "--targets", "qkv_proj", "--rank", "1")
    one_line_error(res, "--rank 1: model.layers.0.self_attn.qkv_proj is a fused Q/K/V matrix")
    t5 = models("t5")
    decompose(t5, tmp_path / "dec", rank=2, progress=False)
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    res = cli(
        *train_args(tmp_path / "dec", tmp_path / "d.jsonl", tmp_path / "t"),
    )
    one_line_error(res, "T5ForConditionalGeneration is an encoder-decoder", "decompose, convert and merge take it")
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()
