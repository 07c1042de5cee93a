"""The SVD methods against a float64 reference: converged exact path, its fallback, minor accuracy."""
import pytest
import torch

from ailora_tools.init import svd
from ailora_tools.init.svd import generator_for, triplets

from synthetic import spiked


def projection(W, r, largest):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sl = slice(0, r) if largest else slice(-r, None)
    return (U[:, sl] * S[sl]) @ Vh[sl]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_principal_converges_by_subspace_iteration(monkeypatch):
    W = spiked(600, 500, torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(svd, "_gram", lambda *a, **k: calls.append(1) or pytest.fail("fell back"))
    t = triplets(W, 8, "principal", mode="exact", generator=generator_for(0, "m", torch.device("cpu")))
    assert rel((t.U * t.S) @ t.Vh, projection(W, 8, True)) < 1e-5
    assert not calls


def test_exact_principal_falls_back_on_a_flat_spectrum():
    W = torch.randn(600, 500, generator=torch.Generator().manual_seed(1))  # σ_8 ≈ σ_9: no quick convergence
    t = triplets(W, 8, "principal", mode="exact", generator=generator_for(0, "m", torch.device("cpu")))
    assert rel((t.U * t.S) @ t.Vh, projection(W, 8, True)) < 1e-8


def test_minor_components_keep_tiny_singular_values():
    """σ_min/σ_max = 1e-4 (σ² ratio 1e-8, below a float32 Gram matrix's rounding): float64 gets them."""
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -4, 64, dtype=torch.float64)
    W = (U * S) @ V.T
    t = triplets(W, 4, "minor")
    torch.testing.assert_close(t.S, S[-4:], rtol=1e-6, atol=0)  # descending, like S
    assert rel((t.U * t.S) @ t.Vh, projection(W, 4, False)) < 1e-6
    G32 = W.float() @ W.float().T  # what a float32 Gram matrix would give: the small σ² drown in rounding
    assert (torch.linalg.eigvalsh(G32.double())[-64:][:4].clamp(min=0).sqrt() - S[-4:].flip(0)).abs().max() > 1e-5


def test_minor_components_of_a_square_matrix():
    """Square matrices have tiny σ_min (here 1.3e-6·σ_max): genuine directions, not a rank deficiency."""
    for n, seed in ((512, 4), (2048, 2048)):
        W = spiked(n, n, torch.Generator().manual_seed(seed)).double()
        t = triplets(W, 8, "minor")
        assert t.deficient == 0
        assert rel((t.U * t.S) @ t.Vh, projection(W, 8, False)) < 1e-6


def test_minor_components_below_the_old_floor_are_kept():
    """bench_svd at 8192²: σ_min = 4.8e-7·σ_max fell under the old "zero" floor √(n·eps64)·σ_max (1.3e-6) and
    was replaced by a random direction (error 3e-2). The same mechanism at n = 512: σ_min = 2e-7·σ_max, under
    √(512·eps64) = 3.4e-7 but far above the float64 Gram method's noise (√eps64 = 1.5e-8)."""
    n, g = 512, torch.Generator().manual_seed(13)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.linspace(2e-3 / n, 2e-3, n, dtype=torch.float64)  # a square bulk: σ grows linearly from the edge
    S[:64] = 3.0 * torch.arange(1, 65, dtype=torch.float64) ** -0.8  # and spikes, as synthetic.spiked has
    S, _ = S.sort(descending=True)
    S[-1] = 2e-7 * S[0]
    W = (U * S) @ V.T
    eps64 = torch.finfo(torch.float64).eps
    assert eps64 ** 0.5 < 2e-7 < (n * eps64) ** 0.5
    t = triplets(W, 8, "minor")
    assert t.deficient == 0
    torch.testing.assert_close(t.S, S[-8:], rtol=1e-4, atol=0)
    assert rel((t.U * t.S) @ t.Vh, (U[:, -8:] * S[-8:]) @ V[:, -8:].T) < 1e-6  # W's own SVD is the reference


def test_exactly_rank_deficient_square_matrices_are_completed():
    """Duplicated and zero rows of a float32 matrix: exact null directions (they come out at σ ≤ 1e-12·σ_max)."""
    W = spiked(256, 256, torch.Generator().manual_seed(5))
    W[:3] = W[3:6]
    W[-2:] = 0
    t = triplets(W.double(), 8, "minor")
    assert t.deficient == 5
    assert t.S[3:].tolist() == [svd.GRAM_NOISE * t.sigma_max] * 5  # the completed ones, after the genuine ones
    torch.testing.assert_close(t.U.T @ t.U, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(t.Vh @ t.Vh.T, torch.eye(8, dtype=torch.float64))
    U, S, Vh = torch.linalg.svd(W.double())
    assert float(S[-5:].max() / S[0]) < 1e-12 < float(S[-8:-5].min() / S[0])  # 5 exact zeros, then genuine ones
    genuine = (U[:, -8:-5] * S[-8:-5]) @ Vh[-8:-5]
    assert rel((t.U[:, :3] * t.S[:3]) @ t.Vh[:3], genuine) < 1e-8


def test_randomized_is_seeded_per_module():
    W = spiked(300, 200, torch.Generator().manual_seed(3))
    cpu = torch.device("cpu")
    a = triplets(W, 4, "principal", mode="randomized", generator=generator_for(5, "x", cpu))
    b = triplets(W, 4, "principal", mode="randomized", generator=generator_for(5, "x", cpu))
    c = triplets(W, 4, "principal", mode="randomized", generator=generator_for(5, "y", cpu))
    assert torch.equal(a.U, b.U) and not torch.equal(a.U, c.U)
    assert rel((a.U * a.S) @ a.Vh, projection(W, 4, True)) < 1e-3


def test_rank_deficient_directions_are_completed():
    W = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    t = triplets(W, 5, "minor")
    assert t.deficient == 5 and bool((t.S > 0).all())
    torch.testing.assert_close(t.U.T @ t.U, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(t.Vh @ t.Vh.T, torch.eye(5, dtype=torch.float64))
