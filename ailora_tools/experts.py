"""Mixture-of-experts weights: how checkpoints name them and how transformers 5 and PEFT hold them.

Checkpoints of Qwen2/3-MoE and Mixtral store every expert's matrices on their own
(`mlp.experts.3.gate_proj.weight`, Mixtral `block_sparse_moe.experts.3.w1.weight`); transformers 5 loads them into
fused 3-D parameters of one `experts` module (`mlp.experts.gate_up_proj` [E, 2I, H] = gate rows then up rows,
`mlp.experts.down_proj` [E, H, I]), which PEFT adapts through `LoraConfig(target_parameters=...)` (`ParamWrapper`:
lora_A [E·R, in] holds expert e's A in rows e·R..(e+1)·R; lora_B [out, R·E] holds expert e's B in columns j·E + e).

Adapters on disk keep the checkpoint's per-expert names (one LoRA pair per stored matrix), so that convert, merge
and the checks work matrix by matrix on the checkpoint as it is. Training fuses them: the pieces of one fused
parameter (gate and up) stack their A rows and put their B blocks on the diagonal (rank R = the pieces' ranks added,
the scale kept by `alpha_pattern`); after training each piece is expert e's rows of the fused B with the fused A
(rank R). GPT-OSS stores its experts fused (`experts.gate_up_proj` [E, H, 2I], gate and up interleaved, with biases):
its expert weights are refused by name (`STORED_FUSED`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertLayout:
    """One family's expert names: the checkpoint's block name, the model's, and the pieces of each fused parameter."""

    stored_block: str
    block: str
    #: fused parameter of the `experts` module -> the stored per-expert matrices it stacks, in row order
    pieces: dict[str, tuple[str, ...]]

    def piece_names(self) -> tuple[str, ...]:
        return tuple(p for group in self.pieces.values() for p in group)

    def fused_of(self, piece: str) -> str:
        return next(f for f, group in self.pieces.items() if piece in group)


_QWEN = ExpertLayout("mlp", "mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)})
#: model_type -> layout, for the families whose checkpoints store experts one matrix each
LAYOUTS = {
    "qwen3_moe": _QWEN,
    "qwen2_moe": _QWEN,
    "mixtral": ExpertLayout("block_sparse_moe", "mlp", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
}
#: model_type -> what its checkpoints store fused, which no target may name
STORED_FUSED = {"gpt_oss": "experts.gate_up_proj [E, H, 2I] with gate and up interleaved, experts.down_proj, biases"}
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
    """Copy the per-expert factors of one fused parameter into its live `ParamWrapper`: A rows stacked, B blocks on
    the diagonal; return the stored module names used.

    Raises:
        KeyError: an expert's piece missing from `factors` (the caller names the adapter).
        ValueError: ranks that do not add up to the wrapper's rank.
    """
    import torch

    A_live, B_live = wrapper.lora_A[adapter_name].weight, wrapper.lora_B[adapter_name].weight
    E, R, used = wrapper.num_experts, wrapper.r[adapter_name], set()
    B_view = B_live.data.view(B_live.shape[0], R, E)
    for e in range(E):
        names = stored_names(fused_name, layout, e)
        pairs = [factors[n] for n in names]
        if sum(A.shape[0] for A, _ in pairs) != R:
            raise ValueError(f"{names[0]}: ranks {[A.shape[0] for A, _ in pairs]} do not add up to {R}")
        with torch.no_grad():
            A_live[e * R : (e + 1) * R].copy_(torch.cat([A for A, _ in pairs]))
            B_view[:, :, e].copy_(torch.block_diag(*[B for _, B in pairs]))
        used.update(names)
    return used


def unfuse(wrapper, fused_name: str, layout: ExpertLayout, adapter_name: str) -> dict:
    """The live factors of one fused parameter as per-expert pairs (float32, CPU): each piece gets the expert's
    fused A and its own rows of the fused B (rank R)."""
    A_live = wrapper.lora_A[adapter_name].weight.detach().float().cpu()
    B_live = wrapper.lora_B[adapter_name].weight.detach().float().cpu()
    E, R = wrapper.num_experts, wrapper.r[adapter_name]
    B_view = B_live.view(B_live.shape[0], R, E)
    out = {}
    for e in range(E):
        names = stored_names(fused_name, layout, e)
        A_e, B_e, rows = A_live[e * R : (e + 1) * R], B_view[:, :, e], B_live.shape[0] // len(names)
        for k, name in enumerate(names):
            out[name] = (A_e.clone(), B_e[k * rows : (k + 1) * rows].clone())
    return out


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
