"""Training an expert LoRA in the form PEFT uses for a transformers 5 MoE model: its fused 3-D expert parameters
through `target_parameters` (`ailora_tools.experts` says how per-expert pairs fuse and come apart again)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import TargetError, UnsupportedError
from ..experts import alpha_for, fused_key, is_expert, layout_of, pattern_key, split_name
from ..io.peft_adapter import Adapter


@dataclass
class ExpertTraining:
    """The expert part of an initial adapter: its per-expert factors, the LoraConfig fields that adapt the fused
    parameters, and the rank/alpha patterns the trained adapter's config records (its pieces have the fused rank)."""

    factors: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)


def expert_training(initial: Adapter, config: dict, *, source: object) -> ExpertTraining:
    """How the expert modules of `initial` (checkpoint names, one pair per expert matrix) train on the model of
    `config`; empty when it adapts no expert.

    Raises:
        TargetError: an expert adapted in some pieces of a fused parameter and not the others (gate without up),
            or pieces of one fused parameter with different ranks or scales across experts.
    """
    layout = layout_of(config)
    parts = {m: p for m in initial.factors if layout and (p := split_name(m, layout))}
    if not parts:
        return ExpertTraining()
    groups: dict[tuple[str, int, str], dict[str, str]] = {}
    for m, (prefix, e, piece) in parts.items():
        groups.setdefault((prefix, e, layout.fused_of(piece)), {})[piece] = m
    ranks: dict[str, set[int]] = {}
    scales: dict[str, set[float]] = {}
    for (_prefix, e, fused), found in groups.items():
        missing = [p for p in layout.pieces[fused] if p not in found]
        if missing:
            raise TargetError(
                f"{source}: adapts {next(iter(found.values()))} but not {', '.join(missing)} of expert "
                f"{e}; transformers holds them in one fused parameter {fused}, so adapt all of "
                f"{', '.join(layout.pieces[fused])} (decompose with {{targets}} {fused})"
            )
        ranks.setdefault(fused, set()).add(sum(initial.factors[m][0].shape[0] for m in found.values()))
        scales.setdefault(fused, set()).update(initial.scale(m) for m in found.values())
    pieces = {pattern_key(p) for p in layout.piece_names()}  # the per-expert form's keys: no module of the model
    rslora, lora, saved = bool(initial.config.get("use_rslora")), _patterns(initial.config, pieces), {}
    for fused in ranks:
        if len(ranks[fused]) > 1 or len(scales[fused]) > 1:
            raise TargetError(
                f"{source}: the experts' {fused} pieces have different ranks or scales; pass an adapter "
                "decomposed with one rank and alpha"
            )
        rank, scale = ranks[fused].pop(), scales[fused].pop()
        key = re.escape(fused_key(layout.block, fused))
        lora["rank_pattern"][key], lora["alpha_pattern"][key] = rank, alpha_for(scale, rank, rslora)
        for piece in layout.pieces[fused]:
            saved.setdefault("rank_pattern", {})[pattern_key(piece)] = rank
            saved.setdefault("alpha_pattern", {})[pattern_key(piece)] = alpha_for(scale, rank, rslora)
    lora["target_parameters"] = sorted(fused_key(layout.block, f) for f in ranks)
    saved = {k: {**(initial.config.get(k) or {}), **v} for k, v in saved.items()}
    return ExpertTraining({m: initial.factors[m] for m in parts}, lora, saved)


def _patterns(config: dict, leave_out: set[str]) -> dict:
    return {
        k: {key: v for key, v in (config.get(k) or {}).items() if key not in leave_out}
        for k in ("rank_pattern", "alpha_pattern")
    }


def linear_offsets(initial: Adapter, config: dict, *, source: object) -> dict:
    """The initial factors that training on the original subtracts (`exact_mode`): every module's but the experts',
    whose fused parameters have no linear layer to hook; a plain LoRA's experts start at B0 = 0 and need none.

    Raises:
        UnsupportedError: an expert with a non-zero initial product (decompose refuses to write one).
    """
    experts = {m: f for m, f in initial.factors.items() if is_expert(m, config)}
    if offset := next((m for m, (_, B0) in experts.items() if B0.any()), None):
        raise UnsupportedError(
            f"{source}: {offset} starts at a non-zero s·B0·A0, which training on the original "
            "cannot subtract from fused expert parameters; train on decompose's residual"
        )
    return {m: f for m, f in initial.factors.items() if m not in experts}
