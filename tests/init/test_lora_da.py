"""LoRA-DA initial factors: the authors' formula, the eigenspace, its limits, determinism, a usable adapter."""

import math

import numpy as np
import pytest
import torch
from helpers import load, logits
from peft import LoraConfig, get_peft_model

from ailora_tools.errors import NumericsError
from ailora_tools.init.lora_da.calibration import calibrate
from ailora_tools.init.lora_da.maths import factor_input, lora_da_factors
from ailora_tools.io.examples import IGNORE, Example

TARGETS = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def dataset(seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(8):
        ids = torch.randint(3, 128, (10 + 2 * i,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 4 + ids[4:]))
    return out


def statistics(path, seed: int = 0) -> dict:
    return {s.name: s for s in calibrate(path, dataset(seed), TARGETS, device="cpu", progress=False)}


def factors(s, **options):
    return lora_da_factors(
        s.gradient,
        s.output_factor,
        factor_input(s.input_factor),
        name=s.name,
        **{"rank": 4, "population_size": 1000, **options},
    )


def authors_formula(G, y, Z, *, rank, population, alpha=1.0, beta=0.03, gamma=1024.0, damping=1e-6):
    """The authors' `_compute_group_initializations_for_betas` for one module, in numpy float64."""
    G, y, Z = (np.asarray(t, dtype=np.float64) for t in (G, y, Z))
    Zl = (Z + Z.T) / 2 + damping * np.eye(len(Z))
    y_inverse = 1 / (y + damping)
    delta = -np.linalg.solve(Zl, G.T) * y_inverse[None, :]  # [in, out]
    sigma = np.linalg.svd(delta, compute_uv=False)[0]
    delta /= sigma
    c = y_inverse.sum() / population / sigma**2
    omega = -alpha * delta @ delta.T + beta * c * np.linalg.inv(Zl)
    evals, evecs = np.linalg.eigh((omega + omega.T) / 2)
    a0 = evecs[:, :rank]
    a0 *= np.where(a0[np.abs(a0).argmax(0), np.arange(rank)] < 0, -1, 1)
    return a0.T / math.sqrt(gamma), (a0.T @ delta).T / math.sqrt(gamma), sigma, evals


def projector(rows: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(np.asarray(rows, dtype=np.float64).T)
    return q @ q.T


@pytest.mark.parametrize("beta", [0.03, 30.0])
def test_matches_the_authors_formula_on_a_random_case(beta):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * torch.linspace(0.1, 3, 24)
    G = torch.randn(16, 24, generator=g, dtype=torch.float64) * 1e-3
    y = torch.rand(16, generator=g, dtype=torch.float64) * 1e-4
    Z = x.T.double() @ x.double() / 300
    A, B, sigma, evals = authors_formula(G, y, Z, rank=4, population=500, beta=beta)
    got = lora_da_factors(G, y, factor_input(Z), rank=4, population_size=500, beta=beta)
    assert got.a.dtype == got.b.dtype == torch.float32 and got.a.shape == (4, 24) and got.b.shape == (16, 4)
    assert np.abs(got.a.numpy() - A).max() <= 1e-6 * np.abs(A).max()
    assert np.abs(got.b.numpy() - B).max() <= 1e-6 * np.abs(B).max()
    d = got.diagnostics
    assert d["sigma_max"] == pytest.approx(sigma, rel=1e-6)
    assert (d["eigenvalue_min"], d["eigenvalue_edge"], d["eigenvalue_next"]) == pytest.approx(
        (evals[0], evals[3], evals[4]), rel=1e-6, abs=1e-12
    )
    assert d["gradient_norm"] == pytest.approx(float(G.norm()), rel=1e-12) and d["gamma"] == 1024.0


def test_a0_spans_the_smallest_eigenspace_of_the_guidance(tiny):
    """On real statistics: √γ·A0 has orthonormal rows spanning Ω's r smallest eigenvectors; B0 = Dᵀ A0ᵀ."""
    for name, s in statistics(tiny("qwen2")).items():
        f = factors(s)
        A, B = f.a.double().numpy(), f.b.double().numpy()
        assert np.abs(A @ A.T * 1024 - np.eye(4)).max() <= 1e-6
        Zl = s.input_factor.double().numpy()
        Zl = (Zl + Zl.T) / 2 + 1e-6 * np.eye(len(Zl))
        y_inverse = 1 / (s.output_factor.double().numpy() + 1e-6)
        delta = -np.linalg.solve(Zl, s.gradient.double().numpy().T) * y_inverse
        delta /= np.linalg.norm(delta, 2)
        c = y_inverse.sum() / 1000 / f.diagnostics["sigma_max"] ** 2
        omega = -delta @ delta.T + 0.03 * c * np.linalg.inv(Zl)
        evals, evecs = np.linalg.eigh(omega)
        assert np.abs(projector(A) - projector(evecs[:, :4].T)).max() <= 1e-5, name
        assert np.abs(np.sort(np.diag(A @ omega @ A.T) * 1024) - evals[:4]).max() <= 1e-6 * np.abs(evals).max()
        assert np.abs(B - delta.T @ A.T).max() <= 1e-6 * np.abs(B).max()
        assert f.diagnostics["eigenvalue_edge"] <= f.diagnostics["eigenvalue_next"]
        assert 0 < f.diagnostics["captured"] <= 1


def test_each_term_alone_gives_its_own_subspace(tiny):
    """β = 0: the natural gradient's top right singular vectors; α = 0: the input's highest-variance directions."""
    s = statistics(tiny("llama"))["model.layers.1.self_attn.v_proj"]
    Zl = s.input_factor.double().numpy() + 1e-6 * np.eye(64)
    natural = (s.gradient.double().numpy() / (s.output_factor.double().numpy()[:, None] + 1e-6)) @ np.linalg.inv(Zl)
    top_right = np.linalg.svd(natural)[2][:4]
    assert np.abs(projector(factors(s, beta=0.0).a) - projector(top_right)).max() <= 1e-5
    top_variance = np.linalg.eigh((Zl + Zl.T) / 2)[1][:, -4:].T
    assert np.abs(projector(factors(s, alpha=0.0).a) - projector(top_variance)).max() <= 1e-5


def test_deterministic_and_data_dependent(tiny):
    first, second, other = statistics(tiny("llama")), statistics(tiny("llama")), statistics(tiny("llama"), seed=1)
    for name in TARGETS:
        a, b = factors(first[name]), factors(second[name])
        assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b) and a.diagnostics == b.diagnostics
        assert np.abs(projector(a.a) - projector(factors(other[name]).a)).max() > 0.1


def test_factors_make_a_peft_adapter_with_the_base_offset_or_a_descent_step_without(tiny):
    """Residual W − s·B0A0 + adapter reproduces the original logits; the authors' un-offset base plus the adapter,
    at a larger step, lowers the calibration loss: B0A0 points downhill."""
    path = tiny("llama")
    stats = statistics(path)
    rank, alpha = 4, 8.0
    scale = alpha / rank

    def adapted(offset: bool, gamma: float):
        model = load(path, "llama")
        modules = dict(model.named_modules())
        init = {name: factors(s, gamma=gamma) for name, s in stats.items()}
        with torch.no_grad():
            for name, f in init.items():
                if offset:
                    modules[name].weight -= scale * f.b @ f.a
        peft = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft_modules = dict(peft.named_modules())
        with torch.no_grad():
            for name, f in init.items():
                peft_modules["base_model.model." + name].lora_A["default"].weight.copy_(f.a)
                peft_modules["base_model.model." + name].lora_B["default"].weight.copy_(f.b)
        return peft.eval()

    assert (logits(adapted(True, 1024.0), "llama") - logits(load(path, "llama"), "llama")).abs().max() <= 1e-5

    def loss(model) -> float:
        with torch.no_grad():
            return sum(
                float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                for e in dataset()
            ) / len(dataset())

    assert loss(adapted(False, 1.0)) < loss(load(path, "llama")) - 1e-3


def test_bad_input_raises_numerics_errors():
    x = torch.randn(50, 8)
    Z, G, y = x.T @ x / 50, torch.randn(6, 8), torch.rand(6)
    cases = [
        (
            lambda: lora_da_factors(G, y, factor_input(Z), rank=8, population_size=10),
            r"rank 8 must be at least 1 and below the input size 8",
        ),
        (
            lambda: lora_da_factors(torch.zeros(6, 8), y, factor_input(Z), rank=2, population_size=10, name="q"),
            r"q: the natural gradient is zero",
        ),
        (lambda: factor_input(-torch.eye(8), name="layers.0.q"), r"layers.0.q: Z \+ 1e-06·I is not positive definite"),
        (lambda: lora_da_factors(G * float("nan"), y, factor_input(Z), rank=2, population_size=10), r"NaN or Inf"),
        (lambda: lora_da_factors(G, y, factor_input(Z), rank=2, population_size=0), r"need population_size ≥ 1"),
        (lambda: lora_da_factors(G.T, y, factor_input(Z), rank=2, population_size=10), r"do not fit together"),
    ]
    for call, message in cases:
        with pytest.raises(NumericsError, match=message):
            call()
