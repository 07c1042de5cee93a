"""Mixture-of-experts weights: how checkpoints name them and how transformers 5 and PEFT hold them.

Checkpoints of Qwen2/3-MoE and Mixtral store every expert's matrices on their own
(`mlp.experts.3.gate_proj.weight`, Mixtral `block_sparse_moe.experts.3.w1.weight`); transformers 5 loads them into
fused 3-D parameters of one `experts` module (`mlp.experts.gate_up_proj` [E, 2I, H] = gate rows then up rows,
`mlp.experts.down_proj` [E, H, I]), which PEFT adapts through `LoraConfig(target_parameters=...)` (`ParamWrapper`:
lora_A [E·R, in] holds expert e's A in rows e·R..(e+1)·R; lora_B [out, R·E] holds expert e's B in columns j·E + e).
GPT-OSS checkpoints store the fused parameters as the model holds them, transposed and interleaved
(`mlp.experts.gate_up_proj` [E, H, 2I]: output column 2j is gate row j, 2j + 1 up row j; `down_proj` [E, I, H]; with
biases); PEFT reads the experts module's `is_transposed` and adds expert e's (B·A)ᵀ, so B's rows stay in W [out, in]
order, interleaved like the parameter's columns.

Adapters on disk keep one LoRA pair per expert matrix under per-expert names (the checkpoint's; for GPT-OSS virtual
ones, `mlp.experts.3.gate_proj`, each naming a slice of a stored 3-D tensor: `expert_slices`), so that convert, merge
and the checks work matrix by matrix. Training fuses them: the pieces of one fused parameter (gate and up) stack
their A rows and put their B blocks in their own output rows and columns (rank R = the pieces' ranks added, the
scale kept by `alpha_pattern`); after training each piece is expert e's rows of the fused B with the fused A (rank R).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertLayout:
    """One family's expert names: the checkpoint's block name, the model's, the pieces of each fused parameter, and
    how the fused parameters lay them out."""

    stored_block: str
    block: str
    #: fused parameter of the `experts` module -> the per-expert matrices it holds, in row order
    pieces: dict[str, tuple[str, ...]]
    #: the checkpoint stores the fused parameters (`{block}.experts.gate_up_proj` [E, ...]), not one matrix per expert
    stored_fused: bool = False
    #: the fused parameters are [E, in, out] (else [E, out, in])
    transposed: bool = False
    #: the pieces take alternate output rows (gate, up, gate, ...; else one block each)
    interleaved: bool = False

    def piece_names(self) -> tuple[str, ...]:
        return tuple(p for group in self.pieces.values() for p in group)

    def fused_of(self, piece: str) -> str:
        return next(f for f, group in self.pieces.items() if piece in group)

    def rows(self, piece: str, out: int) -> slice:
        """The output rows of `piece` in its fused parameter's W [out, in] (`out` rows for all its pieces)."""
        group = self.pieces[self.fused_of(piece)]
        k, n = group.index(piece), len(group)
        return slice(k, None, n) if self.interleaved else slice(k * out // n, (k + 1) * out // n)


_QWEN = ExpertLayout("mlp", "mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)})
#: model_type -> layout, for the mixture-of-experts families supported
LAYOUTS = {
    "qwen3_moe": _QWEN,
    "qwen2_moe": _QWEN,
    "mixtral": ExpertLayout("block_sparse_moe", "mlp", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
    "gpt_oss": ExpertLayout("mlp", "mlp", _QWEN.pieces, stored_fused=True, transposed=True, interleaved=True),
}
#: the router of each family, never adapted unless named
ROUTERS = ("gate", "router")


def layout_of(config: dict) -> ExpertLayout | None:
    """The expert layout of a model config (by `model_type`), or None for models without one we support."""
    return LAYOUTS.get(config.get("model_type", ""))


def split_name(module: str, layout: ExpertLayout) -> tuple[str, int, str] | None:
    """(layer prefix, expert index, piece) of a stored per-expert module name, or None for any other module.

    Example:
        >>> split_name("model.layers.1.mlp.experts.3.up_proj", LAYOUTS["qwen3_moe"])
        ('model.layers.1', 3, 'up_proj')
    """
    pieces = "|".join(map(re.escape, layout.piece_names()))
    m = re.fullmatch(rf"(.+)\.{re.escape(layout.stored_block)}\.experts\.(\d+)\.({pieces})", module)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert's matrix lies in a stored fused parameter: the 3-D tensor, the expert, the output rows
    (start, stop, step) of its W [out, in], whether the tensor is [E, in, out]; and the matrix's shape [out, in]."""

    tensor: str
    expert: int
    rows: tuple[int, int | None, int]
    transposed: bool
    shape: tuple[int, int]

    def matrix(self, T):
        """The expert's W [out, in] as a view of the stored tensor `T` (writing into it writes `T`)."""
        W = T[self.expert].T if self.transposed else T[self.expert]
        return W[slice(*self.rows)]


def expert_slices(tensors: dict, config: dict) -> dict[str, ExpertSlice]:
    """Every expert matrix of a checkpoint that stores its experts fused (GPT-OSS), by its per-expert name
    ("model.layers.0.mlp.experts.3.up_proj"), from the checkpoint's `tensors` (name -> TensorInfo); empty for other
    checkpoints."""
    layout = layout_of(config)
    if layout is None or not layout.stored_fused:
        return {}
    fused = "|".join(map(re.escape, layout.pieces))
    out = {}
    for name, t in tensors.items():
        m = re.fullmatch(rf"(.+)\.{re.escape(layout.block)}\.experts\.({fused})", name)
        if m is None or len(t.shape) != 3:
            continue
        n_out, n_in = (t.shape[2], t.shape[1]) if layout.transposed else (t.shape[1], t.shape[2])
        for e in range(t.shape[0]):
            for piece in layout.pieces[m[2]]:
                rows = layout.rows(piece, n_out)
                out[f"{m[1]}.{layout.stored_block}.experts.{e}.{piece}"] = ExpertSlice(
                    name, e, (rows.start, rows.stop, rows.step), layout.transposed, (len(range(n_out)[rows]), n_in)
                )
    return out


def is_expert(module: str, config: dict) -> bool:
    """Whether `module` (a checkpoint's name) is one expert's matrix of a supported MoE family."""
    layout = layout_of(config)
    return layout is not None and split_name(module, layout) is not None


def expert_modules(modules) -> list[str]:
    """The per-expert matrices among `modules` (an adapter's), sorted; empty when it adapts no expert."""
    return sorted(m for m in modules if any(split_name(m, lay) for lay in LAYOUTS.values()))


def pattern_key(piece: str) -> str:
    """The rank/alpha pattern key (PEFT's regex rule) of every expert's `piece`."""
    return rf"experts\.\d+\.{re.escape(piece)}"


def fused_key(block: str, fused: str) -> str:
    """PEFT's `target_parameters` entry and pattern key of a fused expert parameter ("mlp.experts.gate_up_proj")."""
    return f"{block}.experts.{fused}"


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives `scale` at `rank` (PEFT: alpha/r, or alpha/√r with rsLoRA)."""
    return scale * (math.sqrt(rank) if rslora else rank)


def wrappers(model) -> dict[str, tuple[str, object]]:
    """PEFT's `ParamWrapper` layers of a live model: the fused parameter each adapts, as the model names it
    ("model.layers.0.mlp.experts.gate_up_proj"), -> (the wrapper's own module name without PEFT's
    `base_model.model.`, the wrapper)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "parameter_name") and hasattr(module, "num_experts") and hasattr(module, "lora_A"):
            live = name.removeprefix("base_model.model.")
            owner = re.sub(r"(\.base_layer)+$", "", live)
            out[f"{owner}.{module.parameter_name}"] = (live, module)
    return out


def live_factors(model, config: dict, adapter_name: str) -> tuple[set[str], dict]:
    """(the wrappers' module names, their factors as per-expert pairs under the checkpoint's names)."""
    layout, found, factors = layout_of(config), wrappers(model), {}
    for fused_name, (_, wrapper) in found.items():
        factors.update(unfuse(wrapper, fused_name, layout, adapter_name))
    return {live for live, _ in found.values()}, factors


def load_live(model, config: dict, factors: dict, adapter_name: str) -> tuple[set[str], set[str]]:
    """Copy per-expert `factors` into the live wrappers; (the wrappers' module names, the factors' modules used)."""
    layout, found, used = layout_of(config), wrappers(model), set()
    for fused_name, (_, wrapper) in found.items():
        used |= fuse_into(wrapper, fused_name, layout, factors, adapter_name)
    return {live for live, _ in found.values()}, used


def stored_names(fused_name: str, layout: ExpertLayout, expert: int) -> list[str]:
    """The stored module names of `expert`'s pieces of a fused parameter ("model.layers.0.mlp.experts.gate_up_proj")."""
    owner, fused = fused_name.rsplit(".", 1)
    prefix = owner.removesuffix(f".{layout.block}.experts")
    return [f"{prefix}.{layout.stored_block}.experts.{expert}.{p}" for p in layout.pieces[fused]]


def fuse_into(wrapper, fused_name: str, layout: ExpertLayout, factors: dict, adapter_name: str) -> set[str]:
    """Copy the per-expert factors of one fused parameter into its live `ParamWrapper`: A rows stacked, each piece's B
    in its own output rows (`ExpertLayout.rows`) and columns; return the stored module names used.

    Raises:
        KeyError: an expert's piece missing from `factors` (the caller names the adapter).
        ValueError: ranks that do not add up to the wrapper's rank.
    """
    import torch

    A_live, B_live = wrapper.lora_A[adapter_name].weight, wrapper.lora_B[adapter_name].weight
    E, R, used = wrapper.num_experts, wrapper.r[adapter_name], set()
    out, pieces = B_live.shape[0], layout.pieces[fused_name.rsplit(".", 1)[1]]
    B_view = B_live.data.view(out, R, E)
    for e in range(E):
        names = stored_names(fused_name, layout, e)
        pairs = [factors[n] for n in names]
        if sum(A.shape[0] for A, _ in pairs) != R:
            raise ValueError(f"{names[0]}: ranks {[A.shape[0] for A, _ in pairs]} do not add up to {R}")
        with torch.no_grad():
            A_live[e * R : (e + 1) * R].copy_(torch.cat([A for A, _ in pairs]))
            B_e, col = B_view[:, :, e], 0
            B_e.zero_()
            for piece, (A, B) in zip(pieces, pairs):
                B_e[layout.rows(piece, out), col : col + A.shape[0]] = B
                col += A.shape[0]
        used.update(names)
    return used


def unfuse(wrapper, fused_name: str, layout: ExpertLayout, adapter_name: str) -> dict:
    """The live factors of one fused parameter as per-expert pairs (float32, CPU): each piece gets the expert's
    fused A and its own rows of the fused B (rank R)."""
    A_live = wrapper.lora_A[adapter_name].weight.detach().float().cpu()
    B_live = wrapper.lora_B[adapter_name].weight.detach().float().cpu()
    E, R, out = wrapper.num_experts, wrapper.r[adapter_name], B_live.shape[0]
    B_view, pieces = B_live.view(out, R, E), layout.pieces[fused_name.rsplit(".", 1)[1]]
    result = {}
    for e in range(E):
        A_e, B_e = A_live[e * R : (e + 1) * R], B_view[:, :, e]
        for piece, name in zip(pieces, stored_names(fused_name, layout, e)):
            result[name] = (A_e.clone(), B_e[layout.rows(piece, out)].clone())
    return result


def layout_by_names(modules) -> ExpertLayout | None:
    """The layout whose per-expert names some of `modules` carry (adapters record no model type), or None."""
    return next((lay for lay in LAYOUTS.values() if any(split_name(m, lay) for m in modules)), None)


def lift_initial(initial, trained):
    """The initial adapter in the trained one's form (an `io.peft_adapter.Adapter`): where training fused the pieces
    of an expert's parameter (gate and up, rank r each -> one rank-2r LoRA), each piece's initial pair becomes
    (A0 of all pieces stacked, its B0 in its own columns, zeros elsewhere), with the same product and scale; the
    adapter unchanged where nothing was fused."""
    import dataclasses

    import torch

    layout, factors = layout_by_names(trained.factors), dict(initial.factors)
    if layout is None:
        return initial
    config = {
        **initial.config,
        "rank_pattern": dict(initial.config.get("rank_pattern") or {}),
        "alpha_pattern": dict(initial.config.get("alpha_pattern") or {}),
    }
    rslora = bool(config.get("use_rslora"))
    for m, (A, _B) in trained.factors.items():
        parts = split_name(m, layout) if m in initial.factors else None
        if parts is None or initial.factors[m][0].shape[0] == A.shape[0]:
            continue
        prefix, e, piece = parts
        names = [f"{prefix}.{layout.stored_block}.experts.{e}.{p}" for p in layout.pieces[layout.fused_of(piece)]]
        if any(n not in initial.factors for n in names):
            continue
        A0 = torch.cat([initial.factors[n][0] for n in names])
        if A0.shape[0] != A.shape[0]:
            continue
        blocks = [torch.zeros_like(initial.factors[n][1]) for n in names]
        blocks[names.index(m)] = initial.factors[m][1]
        factors[m] = (A0, torch.cat(blocks, dim=1))
        config["rank_pattern"][pattern_key(piece)] = A0.shape[0]
        config["alpha_pattern"][pattern_key(piece)] = alpha_for(initial.scale(m), A0.shape[0], rslora)
    return dataclasses.replace(initial, config=config, factors=factors)
