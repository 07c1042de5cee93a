"""eva matches PEFT's own EVA (peft 0.21: `initialize_lora_eva_weights` on a model made with
`init_lora_weights="eva"`) on a tiny Llama and a tiny BERT, on the same calibration samples: A0 (each direction up to
its sign), the rank of every module after the redistribution (ρ > 1), B0 = 0, and the step-0 outputs (the model's).

PEFT's incremental PCA is deterministic but approximate: each step keeps only round(r·ρ) components and takes a
`torch.svd_lowrank` of q = 2·round(r·ρ) columns (seed 42), and it stops once consecutive steps agree (`tau`). It is
exact when the dataloader is one batch of every sample (PEFT cycles it: the second step sees the same rows, which
leaves the components and their ratios as the first step's) and q reaches the input width, which the ranks here are
chosen for (2·r·ρ = hidden size). `use_label_mask=False`: every real token, as ours takes them.
"""

import json
import shutil

import pytest
import torch
from helpers import cli, compare_briefly, lm_logits
from helpers.calibration import SAMPLES, samples, source
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from ailora_tools.adapters.conversion import convert
from ailora_tools.adapters.merging import merge
from ailora_tools.analysis import spectrum
from ailora_tools.decomposition import decompose
from ailora_tools.demo import data_file
from ailora_tools.errors import UnsupportedError
from ailora_tools.init.eva import DENSE_WIDTH, principal_directions, redistribute
from ailora_tools.io.peft_adapter import read_adapter, with_ranks
from ailora_tools.testing.peft_data_inits import peft_init
from ailora_tools.training import get_ailora_model
from ailora_tools.training.trainer import train

RHO = 2.0
DATA = data_file("demo_train.jsonl")
PARITY = 1e-4
#: (auto class, task, alpha) per kind
CASES = {"llama": (AutoModelForCausalLM, "causal-lm", 8.0), "bert": (AutoModelForMaskedLM, "masked-lm", 24.0)}
#: (kind, ρ, targets, rank): 2·r·ρ = the hidden size, every target reading a hidden-wide input
EVA_CASES = [
    ("llama", RHO, ("q_proj", "v_proj", "o_proj"), 16),
    ("bert", RHO, ("query", "value", "attention.output.dense"), 12),
    ("llama", 1.0, ("q_proj", "o_proj"), 32),  # ρ = 1: r everywhere (r = 32: the width 64 again)
]


def peft_eva(src, auto, data, task, targets, rank, alpha, rho, count=SAMPLES):
    model = auto.from_pretrained(src, dtype=torch.float32)
    rows = samples(src, data, task, count)
    peft, _ = peft_init(model, "eva", rows, rank=rank, alpha=alpha, targets=targets, rho=rho)
    return peft.eval(), rows[0][0]


def ours(src, out, data, task, targets, rank, alpha, rho, count=SAMPLES):
    flags = ("--task", task, "--samples", str(count), "--max-length", "64", "--targets", ",".join(targets))
    res = cli("decompose", src, "-o", out, "--method", "eva", "--data", data, *flags, "--rank", str(rank),
              "--alpha", str(alpha), "--eva-rho", str(rho), "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert not (out / "residual").exists()  # the base is untouched
    return load_file(out / "adapter" / "adapter_model.safetensors"), json.loads(
        (out / "adapter" / "adapter_config.json").read_text()
    )


def aligned(A, pA):
    """A with each row's sign that best matches PEFT's row, and those signs."""
    d = torch.where((A * pA).sum(1) < 0, -1.0, 1.0)
    return A * d[:, None], d


@pytest.mark.parametrize("kind,rho,targets,rank", EVA_CASES)
def test_same_factors_ranks_and_start_as_peft(llama, encoder, tmp_path, kind, rho, targets, rank):
    auto, task, alpha = CASES[kind]
    src, data = source(kind, llama, encoder, tmp_path)
    peft, ids = peft_eva(src, auto, data, task, targets, rank, alpha, rho)
    adapter, config = ours(src, tmp_path / "d", data, task, targets, rank, alpha, rho)
    pc = peft.peft_config["default"]
    assert config["rank_pattern"] == pc.rank_pattern and config["alpha_pattern"] == pc.alpha_pattern
    ranks = {}
    for name, layer in peft.base_model.model.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        key = f"base_model.model.{name}"
        A, B = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
        pA = layer.lora_A["default"].weight.detach()
        assert A.shape == pA.shape and B.shape == (layer.out_features, pA.shape[0])  # the same rank
        assert torch.equal(B, torch.zeros_like(B)) and not layer.lora_B["default"].weight.any()
        assert layer.scaling["default"] == pytest.approx(alpha / rank)  # α·rₘ/r over rₘ: the scale of rank r
        flipped, d = aligned(A, pA)
        torch.testing.assert_close(flipped, pA, rtol=0, atol=2e-4)  # unit vectors: float32 vs float64
        assert (d > 0).all()  # and PEFT's sign convention (each row's largest entry positive)
        ranks[name] = A.shape[0]
    dropped = {k.rsplit(".lora_A", 1)[0][len("base_model.model.") :] for k in adapter if ".lora_A" in k} - set(ranks)
    assert not dropped  # PEFT leaves out the rank-0 modules, and so do we
    assert sum(ranks.values()) <= rank * 2 * len(targets)  # the budget, less what rank-0 modules would have had
    if rho == 1.0:
        assert set(ranks.values()) == {rank} and config["rank_pattern"] == {}
    else:
        assert len(set(ranks.values())) > 1 and max(ranks.values()) <= round(rank * rho)
    with torch.no_grad():
        want = auto.from_pretrained(src, dtype=torch.float32).eval()(input_ids=ids).logits
        torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        mine = PeftModel.from_pretrained(auto.from_pretrained(src, dtype=torch.float32), tmp_path / "d" / "adapter")
        torch.testing.assert_close(mine.eval()(input_ids=ids).logits, want, rtol=0, atol=1e-5)  # ours on the original


def test_the_comparison_catches_a_wrong_sign_scale_or_rank():
    """The checks above fail on a flipped direction (not PEFT's sign), a scaled one, or one rank moved."""
    torch.manual_seed(0)
    pA = torch.linalg.qr(torch.randn(16, 8)).Q.T
    flipped, d = aligned(pA * torch.tensor([1.0] * 7 + [-1.0])[:, None], pA)
    assert not (d > 0).all()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(aligned(pA * 1.01, pA)[0], pA, rtol=0, atol=2e-4)
    ratios = {"a": torch.tensor([0.5, 0.2, 0.1]), "b": torch.tensor([0.4, 0.3, 0.05])}
    assert redistribute(ratios, 4) == {"a": 2, "b": 2} and redistribute(ratios, 5) == {"a": 3, "b": 2}
    tie = {"q": torch.tensor([0.5, 0.2]), "v": torch.tensor([0.5, 0.2])}  # one input: ties go to the earlier
    assert redistribute(tie, 3) == {"q": 2, "v": 1}


def test_wide_inputs_take_the_krylov_search_and_agree_with_a_dense_eigh():
    """Above DENSE_WIDTH the leading eigenpairs come from `svd`'s exact principal search, not a dense eigh: the same
    directions (PEFT's signs) and ratios as the dense float64 eigendecomposition of the same scatter."""
    torch.manual_seed(0)
    width, top = DENSE_WIDTH + 476, 12
    X = torch.randn(3000, width, dtype=torch.float64) * torch.logspace(0, -2, width, dtype=torch.float64)
    X = X - X.mean(0)
    scatter = X.T @ X
    V, ratios = principal_directions(scatter, top, 3000, name="wide")
    values, vectors = torch.linalg.eigh(scatter)
    want = vectors[:, -top:].flip(1).T
    want = want * want[torch.arange(top), want.abs().argmax(1)].sign()[:, None]
    torch.testing.assert_close(V, want.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ratios, values[-top:].flip(0) / scatter.trace(), rtol=1e-9, atol=0)


def concentrated(tmp_path, llama):
    """The fixture's Llama with layer 0's attention and layer 1's MLP reading 2 of the 64 hidden directions: their
    inputs' variance sits in 2 directions, so at r = 1, ρ = 8 they take the budget and layer 1's q/k/v get rank 0."""
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[2:] = 0
        model.model.layers[1].post_attention_layernorm.weight[2:] = 0
    shutil.copytree(llama, tmp_path / "c")
    for f in (tmp_path / "c").glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(tmp_path / "c", max_shard_size="60KB")
    return tmp_path / "c"


@pytest.mark.parametrize(
    "concentrate,targets,rank,rho,zero",
    [
        (False, ("q_proj", "v_proj", "down_proj"), 4, 3.0, 0),
        (True, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 1, 8.0, 3),
    ],
)
def test_decompose_train_convert_merge_parity(llama, tmp_path, concentrate, targets, rank, rho, zero):
    """Ranks by module, rank 0 included, survive train, convert and merge: trained = converted = merged logits."""
    src = concentrated(tmp_path, llama) if concentrate else llama
    s = decompose(src, tmp_path / "d", method="eva", rank=rank, eva_rho=rho, data=DATA, samples=8, max_length=64,
                  progress=False, targets=targets)  # fmt: skip
    manifest = json.loads((tmp_path / "d" / "ailora.json").read_text())
    assert manifest["method"] == "eva" and manifest["adapter_base"] == "original" and manifest["no_offset"]
    assert s["residual"] is None and not (tmp_path / "d" / "residual").exists()
    initial = read_adapter(tmp_path / "d" / "adapter")
    ranks = {m: A.shape[0] for m, (A, _) in initial.factors.items()}
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= round(rank * rho)
    assert sum(ranks.values()) == rank * 2 * len(targets)  # the whole budget, shared out
    assert len(ranks) == 2 * len(targets) - zero  # the rank-0 modules left out
    assert initial.config["rank_pattern"] == {m: k for m, k in ranks.items() if k != rank}
    start = lm_logits(src, tmp_path / "d" / "adapter")
    torch.testing.assert_close(start, lm_logits(src), rtol=0, atol=0)  # B0 = 0: exactly the model
    train(src, tmp_path / "d" / "adapter", DATA, tmp_path / "t", max_steps=3, lr=1e-2, batch_size=8, progress=False)
    trained_ad = read_adapter(tmp_path / "t")
    assert {m: A.shape[0] for m, (A, _) in trained_ad.factors.items()} == ranks  # the ranks trained
    trained = lm_logits(src, tmp_path / "t")
    assert (trained - start).abs().max() > 1e-3  # training moved the model
    convert(tmp_path / "t", tmp_path / "l")
    merge(src, tmp_path / "l", tmp_path / "m", progress=False)
    assert (trained - lm_logits(src, tmp_path / "l")).abs().max() < PARITY
    assert (trained - lm_logits(tmp_path / "m")).abs().max() < PARITY
    assert read_adapter(tmp_path / "l").config["r"] == max(ranks.values())  # no offset: s·B·A at the largest rank


def test_compare_row(llama, tmp_path):
    s = compare_briefly(llama, DATA, tmp_path / "c", ["eva"])
    assert [r["run"] for r in s["runs"]] == ["eva"]
    assert json.loads((tmp_path / "c" / "eva" / "decomposed" / "ailora.json").read_text())["method"] == "eva"
    assert "| eva |" in (tmp_path / "c" / "compare.md").read_text()


def test_bad_calibration_input_is_one_line(llama, tmp_path):
    def refused(*args, needle):
        res = cli("decompose", llama, "-o", tmp_path / "o", "--method", "eva", *args)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and needle in res.output, res.output
        assert not (tmp_path / "o").exists()

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    refused(needle="needs calibration samples; pass --data")
    refused("--data", tmp_path / "empty.jsonl", needle="no examples")
    refused("--data", tmp_path / "bad.jsonl", needle="bad.jsonl:2")
    refused("--data", DATA, "--samples", "100000", needle="fewer than --samples 100000")
    refused("--data", DATA, "--samples", "4", "--max-length", "5", needle="more than --max-length 5")
    refused("--data", DATA, "--eva-rho", "0.5", needle="--eva-rho")
    refused("--data", DATA, "--rank", "24", "--eva-rho", "3", needle="input width 64; lower --eva-rho")
    (tmp_path / "short.jsonl").write_text('{"text": "a b"}\n')
    refused("--data", tmp_path / "short.jsonl", "--samples", "1", needle="fewer than the 32 input directions")
    with pytest.raises(UnsupportedError, match="decompose --method eva --data"):
        get_ailora_model(AutoModelForCausalLM.from_pretrained(llama), method="eva", rank=4)


def test_peft_made_eva_adapter_converts_with_its_ranks(llama, tmp_path):
    """An adapter PEFT's EVA made (ranks by module) and PEFT trained converts for vLLM as it is: the same logits."""
    peft, _ = peft_eva(llama, AutoModelForCausalLM, DATA, "causal-lm", ("q_proj", "down_proj"), 4, 8.0, RHO)
    assert peft.peft_config["default"].rank_pattern  # the ranks were redistributed
    peft.train()
    optim = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    for ids, labels in samples(llama, DATA, "causal-lm", 8):  # PEFT's training, by hand
        peft(input_ids=ids, labels=labels).loss.backward()
        optim.step()
        optim.zero_grad()
    peft.save_pretrained(tmp_path / "trained")
    res = cli("convert", "--trained", tmp_path / "trained", "-o", tmp_path / "l", "--for", "vllm", "--json")
    assert res.exit_code == 0, res.output
    assert read_adapter(tmp_path / "l").config["init_lora_weights"] is True
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        trained = peft.eval()(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
        converted = PeftModel.from_pretrained(original, tmp_path / "l").eval()(input_ids=ids).logits
    assert (trained - converted).abs().max() < PARITY


def test_a_rank_0_module_is_left_out_as_peft_does():
    A, B = torch.ones(3, 8), torch.zeros(5, 3)
    config = {"r": 2, "lora_alpha": 4.0, "target_modules": ["q_proj"]}
    factors = {"m.0.q_proj": (A, B), "m.1.q_proj": (A[:0], B[:, :0]), "m.2.q_proj": (A[:2], B[:, :2])}
    out, kept = with_ranks(config, factors)
    assert list(kept) == ["m.0.q_proj", "m.2.q_proj"] and out["target_modules"] == ["m.0.q_proj", "m.2.q_proj"]
    assert out["rank_pattern"] == {"m.0.q_proj": 3} and out["alpha_pattern"] == {"m.0.q_proj": 6.0}
    assert with_ranks(config, {"m.2.q_proj": (A[:2], B[:, :2])})[0]["target_modules"] == ["q_proj"]


def test_rank_0_modules_as_peft(llama, tmp_path):
    """Where the redistribution gives modules rank 0, PEFT's EVA and ours give the same ranks and drop the same ones."""
    src, targets = (
        concentrated(tmp_path, llama),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    peft, _ = peft_eva(src, AutoModelForCausalLM, DATA, "causal-lm", targets, 1, 8.0, 8.0, count=8)
    adapter, config = ours(src, tmp_path / "d", DATA, "causal-lm", targets, 1, 8.0, 8.0, count=8)
    theirs = {
        n: m.lora_A["default"].weight.shape[0] for n, m in peft.base_model.model.named_modules() if hasattr(m, "lora_A")
    }
    mine = {
        k[len("base_model.model.") : -len(".lora_A.weight")]: v.shape[0] for k, v in adapter.items() if ".lora_A" in k
    }
    assert mine == theirs and len(theirs) < 2 * len(targets)
    assert config["rank_pattern"] == peft.peft_config["default"].rank_pattern


def test_dora_quantized_residual_and_spectrum(llama, tmp_path):
    """eva with DoRA's magnitudes (step 0 the model's, exact through convert --dora exact), with an NF4 base (its
    factors as without: quantised once, no refit; no offset) and in `spectrum` (ΔW = s·B·A, no offset)."""
    common = dict(method="eva", rank=4, data=DATA, samples=8, max_length=64, progress=False)
    decompose(llama, tmp_path / "d", dora=True, **common)
    assert (lm_logits(llama, tmp_path / "d" / "adapter") - lm_logits(llama)).abs().max() < 1e-5
    train(llama, tmp_path / "d" / "adapter", DATA, tmp_path / "t", max_steps=2, lr=1e-2, batch_size=8, progress=False)
    convert(tmp_path / "t", tmp_path / "x", dora="exact", progress=False)
    trained = lm_logits(llama, tmp_path / "t")
    assert (trained - lm_logits(llama)).abs().max() > 1e-3
    assert (lm_logits(tmp_path / "x" / "base", tmp_path / "x" / "adapter") - trained).abs().max() < PARITY
    decompose(llama, tmp_path / "o", **common)
    train(llama, tmp_path / "o" / "adapter", DATA, tmp_path / "to", max_steps=2, lr=1e-2, batch_size=8, progress=False)
    rows = spectrum(llama, tmp_path / "s", rank=4, adapter=tmp_path / "to", device="cpu", progress=False)["rows"]
    lora = read_adapter(tmp_path / "to")
    for r in rows:  # no offset: ΔW is the trained adapter's own s·B·A
        assert r["delta_fro"] == pytest.approx(float(lora.delta(r["module"]).norm()), rel=1e-4)
    pytest.importorskip("bitsandbytes")
    decompose(llama, tmp_path / "q", quantize="nf4", **common)
    assert json.loads((tmp_path / "q" / "ailora.json").read_text())["no_offset"]
    kept, drawn = read_adapter(tmp_path / "q" / "adapter").factors, read_adapter(tmp_path / "o" / "adapter").factors
    assert kept.keys() == drawn.keys() and all(torch.equal(kept[m][i], drawn[m][i]) for m in drawn for i in (0, 1))
