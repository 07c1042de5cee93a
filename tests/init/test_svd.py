"""The SVD methods against a float64 reference: converged exact path, its fallback, minor accuracy."""

import torch

from ailora_tools.init import svd
from ailora_tools.init.svd import generator_for, triplets
from ailora_tools.testing.synthetic import powerlaw, spiked


def projection(W, r, largest):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sl = slice(0, r) if largest else slice(-r, None)
    return (U[:, sl] * S[sl]) @ Vh[sl]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def within_tolerance(W, t, r):
    """The documented promise against a float64 full SVD: σ to 1e-6 relative, residual ≤ 1e-5·σ_max."""
    S = torch.linalg.svdvals(W.double())
    residual = (W.double() @ t.Vh.T - t.U * t.S).norm(dim=0).max()
    return float(((t.S - S[:r]).abs() / S[:r]).max()) <= 1e-6 and float(residual) <= svd.EXACT_TOL * float(S[0])


def test_exact_principal_converges_by_block_krylov():
    W = spiked(768, 512, torch.Generator().manual_seed(0))
    t = triplets(W, 8, "principal", mode="exact", generator=generator_for(0, "m", torch.device("cpu")))
    assert (t.method, t.iterations > 0) == ("krylov", True)
    assert t.iterations <= 6  # the spikes are well separated: a few steps
    assert rel((t.U * t.S) @ t.Vh, projection(W, 8, True)) < 1e-5
    assert within_tolerance(W, t, 8)


def test_exact_principal_on_a_slowly_decaying_spectrum_stays_in_krylov():
    """σ_i ∝ i^-0.3: σ_16/σ_8 = 0.81, where subspace iteration needed 30 steps and more."""
    W = powerlaw(1024, 0.3, 7)
    t = triplets(W, 8, "principal", generator=generator_for(0, "m", torch.device("cpu")))
    assert t.method == "krylov" and t.iterations <= 10
    assert within_tolerance(W, t, 8)


def test_exact_principal_gives_up_krylov_early_on_a_flat_spectrum():
    W = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))  # σ_8 ≈ σ_9: Krylov would be slow
    t = triplets(W, 8, "principal", mode="exact", generator=generator_for(0, "m", torch.device("cpu")))
    assert t.method == "gram32" and 2 <= t.iterations <= 4  # the rate is measured, then the float32 Gram
    assert rel((t.U * t.S) @ t.Vh, projection(W, 8, True)) < 1e-5
    assert within_tolerance(W, t, 8)


def test_exact_principal_of_small_matrices_uses_the_float32_gram_method():
    """384×384 and 1536×384 (MiniLM's shapes): the float32 Gram method plus float64 Rayleigh–Ritz is
    cheaper than any Krylov run, and meets the tolerance."""
    for m, n in ((384, 384), (1536, 384), (384, 1536)):
        W = spiked(m, n, torch.Generator().manual_seed(m + n))
        t = triplets(W, 16, "principal", generator=generator_for(0, "m", torch.device("cpu")))
        assert (t.method, t.iterations) == ("gram32", 0)
        assert within_tolerance(W, t, 16)
        assert rel((t.U * t.S) @ t.Vh, projection(W, 16, True)) < 1e-5


def test_exact_principal_is_deterministic_and_seeded():
    W = spiked(768, 512, torch.Generator().manual_seed(3))
    a, b = (triplets(W, 8, "principal", generator=generator_for(5, "x", torch.device("cpu"))) for _ in range(2))
    assert a.method == "krylov" and torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_exact_principal_falls_back_to_float64_when_float32_cannot_meet_the_tolerance():
    """σ_2..σ_4 in a cluster from 1e-4 to 1.5e-4·σ_max: σ² spread 1.3e-8·σ_max², under a float32 Gram
    matrix's rounding, so its basis mixes the cluster; the float64 check catches it (residual 2e-5·σ_max)."""
    g = torch.Generator().manual_seed(4)
    U, V = (torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q for _ in range(2))
    S = torch.linspace(1.5e-4, 1e-4, 64, dtype=torch.float64)
    S[0] = 1.0
    W = (U * S) @ V.T
    t = triplets(W, 4, "principal")
    assert t.method == "gram64"
    assert within_tolerance(W, t, 4)


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
    assert eps64**0.5 < 2e-7 < (n * eps64) ** 0.5
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
