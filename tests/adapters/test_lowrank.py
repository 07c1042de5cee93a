"""The LoRA algebra of `adapters.lowrank`, against dense products and torch.linalg.svd."""

import math

import pytest
import torch

from ailora_tools.adapters.lowrank import (
    alpha_for,
    check_tolerance,
    compress,
    config_scale,
    delta_factors,
    fit_rank,
    pad_to_rank,
)
from ailora_tools.errors import FormatError, NumericsError
from ailora_tools.io.peft_adapter import Adapter, lora_config

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_compress_error_is_the_dropped_singular_values_of_the_dense_product(k):
    B, A = rand(12, 8), rand(8, 9)  # rank 8 product, re-compressed to k
    B2, A2, err = compress(B, A, k)
    S = torch.linalg.svd(B @ A).S
    kept = min(k, 8)
    assert B2.shape == (12, kept) and A2.shape == (kept, 9)
    expected = float(S[kept:].square().sum().sqrt() / S.square().sum().sqrt())
    assert err == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Eckart–Young: the kept product is the truncated SVD, so its error is exactly the dropped norm
    dense_err = float(torch.linalg.norm(B @ A - B2 @ A2) / torch.linalg.norm(B @ A))
    assert dense_err == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_compress_of_a_zero_product_has_no_error():
    B2, A2, err = compress(torch.zeros(5, 3, dtype=torch.float64), rand(3, 4), 2)
    assert err == 0.0 and not (B2 @ A2).any()


def adapter(factors, *, r, alpha, rslora=False):
    config = lora_config(rank=r, alpha=alpha, targets=["q_proj"], rslora=rslora, base="m", task_type=None)
    return Adapter(config, factors)


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_factors_reproduce_s_times_BA_minus_B0A0(rslora):
    A0, B0, A, B = rand(4, 10), rand(6, 4), rand(4, 10), rand(6, 4)
    initial = adapter({"model.q_proj": (A0, B0)}, r=4, alpha=8, rslora=rslora)
    trained = adapter({"model.q_proj": (A, B)}, r=4, alpha=8, rslora=rslora)
    pairs, s, unchanged = delta_factors(initial, trained)
    Bd, Ad = pairs["model.q_proj"]
    scale = 8 / (math.sqrt(4) if rslora else 4)
    assert s == pytest.approx(scale) and Bd.shape == (6, 8) and Ad.shape == (8, 10)
    torch.testing.assert_close(s * Bd @ Ad, scale * (B @ A - B0 @ A0))
    assert unchanged == {"model.q_proj": False}
    # a --no-offset start: ΔW = s·B·A, rank r
    pairs, s, _ = delta_factors(initial, trained, offset=False)
    torch.testing.assert_close(s * pairs["model.q_proj"][0] @ pairs["model.q_proj"][1], scale * B @ A)


def test_delta_factors_pair_names_across_the_prefix_and_refuse_other_modules():
    A0, B0 = rand(2, 5), rand(3, 2)
    initial = adapter({"encoder.layer.0.query": (A0, B0)}, r=2, alpha=2)
    trained = adapter({"bert.encoder.layer.0.query": (A0.clone(), B0.clone())}, r=2, alpha=2)
    pairs, _, unchanged = delta_factors(initial, trained, prefix="bert")
    assert list(pairs) == ["bert.encoder.layer.0.query"] and unchanged["bert.encoder.layer.0.query"]
    other = adapter({"bert.encoder.layer.0.value": (A0, B0)}, r=2, alpha=2)
    with pytest.raises(FormatError, match="adapt different modules"):
        delta_factors(initial, other, prefix="bert")


def test_padding_and_fitting_keep_the_product():
    factors = {"a": (rand(2, 7), rand(5, 2)), "b": (rand(4, 7), rand(5, 4))}
    padded = pad_to_rank(factors, 6)
    for m, (A, B) in padded.items():
        assert A.shape == (6, 7) and B.shape == (5, 6)
        torch.testing.assert_close(B @ A, factors[m][1] @ factors[m][0])
    fitted, errors = fit_rank({m: (B, A) for m, (A, B) in factors.items()}, 3)
    assert set(errors) == {"b"} and fitted["a"][0].shape == (2, 7) and fitted["b"][0].shape == (3, 7)
    torch.testing.assert_close(fitted["a"][1] @ fitted["a"][0], factors["a"][1] @ factors["a"][0])


def test_tolerance_names_every_module_above_it():
    assert check_tolerance({"a": 0.1, "b": 0.3}, None, "x", "y") == 0.3
    assert check_tolerance({"a": 0.1}, 0.2, "x", "y") == 0.1
    with pytest.raises(
        NumericsError,
        match=r"--max-rank 2: relative error above --tolerance 0.05 in a \(1.00e-01\), "
        r"b \(3.00e-01\); raise it",
    ):
        check_tolerance({"a": 0.1, "b": 0.3, "c": 0.01}, 0.05, "--max-rank 2", "raise it")


def test_scale_and_alpha_are_inverse():
    for rslora in (False, True):
        config = {"r": 16, "lora_alpha": alpha_for(0.5, 16, rslora), "use_rslora": rslora}
        assert config_scale(config) == pytest.approx(0.5)


@pytest.mark.parametrize("rslora", [False, True])
def test_scales_are_the_s_peft_multiplies_by(rslora):
    """config_scale, lora_scale and Adapter.scale (rank_pattern and alpha_pattern too) give the s PEFT's own LoRA
    layers multiply B·A by: α/r, or α/√r with rsLoRA."""
    from peft import LoraConfig, get_peft_model

    from ailora_tools.init import lora_scale

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "v_proj": torch.nn.Linear(8, 8)})
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        use_rslora=rslora,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 2},
    )
    peft_model = get_peft_model(model, config)
    peft_s = {m: peft_model.base_model.model[m].scaling["default"] for m in ("q_proj", "v_proj")}
    assert peft_s == pytest.approx({"q_proj": 8.0 if rslora else 2.0, "v_proj": 1.0 if rslora else 0.5})
    saved = {
        "r": 16,
        "lora_alpha": 32,
        "use_rslora": rslora,
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"v_proj": 2},
    }
    ours = Adapter(saved, {m: (rand(16, 8), rand(8, 16)) for m in ("q_proj", "v_proj")})
    assert {m: ours.scale(m) for m in peft_s} == pytest.approx(peft_s)
    assert config_scale(saved) == pytest.approx(peft_s["q_proj"]) == lora_scale(16, 32, rslora)
    assert lora_scale(4, 2, rslora) == pytest.approx(peft_s["v_proj"])
