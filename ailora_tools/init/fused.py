"""AILoRA on a fused Q/K/V matrix: one LoRA pair holding Q's principal and V's minor directions.

A fused projection (Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`, GPT-2 `c_attn`, ModernBERT `Wqkv`) stores the
query, key and value matrices as row blocks of one W [out, in]. With rank r, r_Q = ⌈r/2⌉ and r_V = ⌊r/2⌋:

    A0 = [ √Σ_Q V_Qᵀ ; √Σ_V V_Vᵀ ] / √s                        [r, in]  (Q's top r_Q, V's bottom r_V)
    B0[Q rows, :r_Q] = U_Q √Σ_Q / √s,  B0[V rows, r_Q:] = U_V √Σ_V / √s,  every other entry 0   [out, r]

so s·B0·A0 is U_Q Σ_Q V_Qᵀ on the Q rows, U_V Σ_V V_Vᵀ on the V rows and zero on the K rows, exactly the two roles'
products, and W − s·B0·A0 is exact. The pair is an ordinary rank-r LoRA (every server and export takes it); training
updates all of B, so the zero blocks (K rows, Q rows × V's columns, V rows × Q's columns) are free to train and the
blocks couple from the first step. docs/fused-projections.md says more.

Row layouts (`LAYOUTS`), read from transformers 5.25's attention code: "thirds" (GPT-2 `split`, ModernBERT
`view(3, heads, head_dim)`): Q, K, V in equal contiguous thirds; "q-kv" (Phi-3): Q (heads × head_dim), then K and V
(kv_heads × head_dim each); "per-head" (GPT-NeoX `view(heads, 3 × head_size)`): per head, its Q, K and V rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import NumericsError, UnsupportedError
from .targets import MINOR, PRINCIPAL, SPLIT, Architecture, matches

if TYPE_CHECKING:
    import torch

    from .method import Settings

Ranges = tuple[tuple[int, int], ...]
LAYOUTS = ("thirds", "q-kv", "per-head")


@dataclass(frozen=True)
class Rows:
    """Which rows of a fused matrix hold Q, K and V, as [start, end) ranges, and its layout's name."""

    layout: str
    q: Ranges
    k: Ranges
    v: Ranges

    def index(self, part: str) -> torch.Tensor:
        """The row indices of `part` ("q", "k" or "v") as a LongTensor."""
        import torch

        return torch.cat([torch.arange(b, e) for b, e in getattr(self, part)])

    def record(self) -> dict:
        """As the manifest records it."""
        return {"layout": self.layout, **{p: [list(r) for r in getattr(self, p)] for p in "qkv"}}


def split_ranks(rank: int) -> tuple[int, int]:
    """(r_Q, r_V) = (⌈r/2⌉, ⌊r/2⌋): the fused pair's rank r shared by Q's principal and V's minor directions."""
    return (rank + 1) // 2, rank // 2


def qkv_rows(module: str, out: int, arch: Architecture, config: dict) -> Rows:
    """The Q/K/V rows of `module` (a fused matrix of `arch` with `out` output rows), from its layout and `config`.

    Raises:
        UnsupportedError: the config's head counts do not add up to `out` (an unknown layout).
    """
    layout = next(v for k, v in arch.fused.items() if matches(module, k))
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    if layout == "thirds" and out % 3 == 0:
        n = out // 3
        return Rows(layout, ((0, n),), ((n, 2 * n),), ((2 * n, out),))
    if layout == "q-kv":
        dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
        q, kv = heads * dim, (config.get("num_key_value_heads") or heads) * dim
        if q + 2 * kv == out:
            return Rows(layout, ((0, q),), ((q, q + kv),), ((q + kv, out),))
    if layout == "per-head" and out % (3 * heads) == 0:
        d = out // (3 * heads)
        return Rows(
            layout, *(tuple((3 * d * h + i * d, 3 * d * h + (i + 1) * d) for h in range(heads)) for i in range(3))
        )
    raise UnsupportedError(
        f"{module}: {out} output rows do not fit the {layout} Q/K/V layout of this {arch.name} "
        f"config ({heads} heads); give the matrix one role with {{roles}} "
        f"{module.rsplit('.', 1)[-1]}=principal|minor"
    )


def job_rows(
    module: str, role: str | None, shape: tuple[int, int], arch: Architecture, config: dict, rank: int
) -> Rows | None:
    """For a target with the SPLIT role, its Q/K/V rows (`qkv_rows`, W [out, in] of `shape`), the rank checked
    (`check_split`); None for any other role."""
    if role != SPLIT:
        return None
    rows = qkv_rows(module, shape[0], arch, config)
    check_split(module, rows, shape[1], rank)
    return rows


def check_split(module: str, rows: Rows, in_features: int, rank: int) -> None:
    """Refuse a rank that the Q and V row blocks cannot share.

    Raises:
        NumericsError: r_Q or r_V is zero or not below the size of its block.
    """
    for part, r in zip("qv", split_ranks(rank)):
        size = min(sum(e - b for b, e in getattr(rows, part)), in_features)
        if not 0 < r < size:
            raise NumericsError(
                f"{{rank}} {rank}: {module} is a fused Q/K/V matrix whose rank ailora shares "
                f"between Q's principal and V's minor directions (r_Q, r_V = {split_ranks(rank)}); "
                f"each must be at least 1 and below {size}, the size of the {part.upper()} block; "
                "pass a {rank} of 2 or more that fits"
            )


def fused_factors(W: torch.Tensor, rows: Rows, settings: Settings, *, generator=None):
    """(A0 [r, in], B0 [out, r]) of a fused Q/K/V matrix W [out, in] as the module docstring builds them, and the
    manifest stats: per role its spectrum facts, the rows, and which of A0's rows (B0's columns) hold which role."""
    import torch

    from .method import svd_factors

    r_q, r_v = split_ranks(settings.rank)
    B0 = torch.zeros(W.shape[0], settings.rank, dtype=torch.float32, device=W.device)
    As, stats = (
        [],
        {
            "role": SPLIT,
            "fused": {
                "rows": rows.record(),
                "rank": {"q": r_q, "v": r_v},
                "columns": {"q": [0, r_q], "v": [r_q, r_q + r_v]},
            },
        },
    )
    for part, role, r, col in (("q", PRINCIPAL, r_q, 0), ("v", MINOR, r_v, r_q)):
        idx = rows.index(part).to(W.device)
        A, B, stats[part] = svd_factors(W[idx], role, settings, generator=generator, rank=r)
        As.append(A)
        B0[idx, col : col + r] = B
    return torch.cat(As).contiguous(), B0, stats
