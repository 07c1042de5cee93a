"""Expert targets as users write them, mapped to the matrices a mixture-of-experts checkpoint stores.

A checkpoint of a supported family (`ailora_tools.experts.LAYOUTS`) stores one matrix per expert, or (GPT-OSS) the
fused 3-D parameters whose per-expert slices take per-expert names (`experts.expert_slices`); users name them per
expert (`gate_proj`, Mixtral's `w1,w2,w3`: PEFT's suffix rule), as transformers 5 holds them (`gate_up_proj`,
`experts.down_proj`, `mlp.experts.gate_up_proj`: PEFT's `target_parameters`) or all at once (`experts`). The
fused names expand to every expert's pieces. The router (`gate`, `router`) is a target only when named.
Fused 3-D expert tensors of a layout not in `LAYOUTS` and the options PEFT cannot apply to fused expert parameters
are refused here, before anything is written.
"""

from __future__ import annotations

import re

from ..errors import OptionError, TargetError, UnsupportedError
from ..experts import LAYOUTS, ExpertLayout, layout_of, split_name
from ..io.tensorio import TensorInfo
from .targets import matches

SUPPORTED = ", ".join(LAYOUTS)


def expert_targets(config: dict, targets: list[str], modules: list[str], tensors: dict[str, TensorInfo]) -> list[str]:
    """`targets` with every name of fused expert parameters replaced by the stored per-expert matrices it covers
    (as `experts.E.piece` suffixes); names that match a stored module as they are stay as they are.

    Raises:
        UnsupportedError: a target naming fused (3-D) expert tensors of a layout this tool does not know, naming
            what is supported.
    """
    layout, out = layout_of(config), []
    for t in targets:
        if any(matches(m, t) for m in modules):
            out.append(t)
            continue
        if layout is None or not layout.stored_fused:
            _refuse_stored_fused(config, t, tensors)
        out.extend(_expand(t, layout, modules) if layout else [t])
    return out


def _refuse_stored_fused(config: dict, target: str, tensors: dict[str, TensorInfo]) -> None:
    """Refuse a target naming 3-D expert tensors of a checkpoint whose family's fused layout is unknown."""
    name = target.rsplit(".", 1)[-1]
    fused = sorted(
        n
        for n, t in tensors.items()
        if len(t.shape) == 3 and ".experts." in n and (name == "experts" or n.rsplit(".", 1)[-1] == name)
    )
    if fused:
        kind = config.get("model_type", "this model")
        raise UnsupportedError(
            f"{{targets}} {target}: {kind} checkpoints store their experts fused ({fused[0]} "
            f"{list(tensors[fused[0]].shape)}) in a layout this tool does not know; expert LoRA supports "
            f"{SUPPORTED}; adapt this model's attention projections instead "
            "({targets} q_proj,k_proj,v_proj,o_proj)"
        )


def _expand(target: str, layout: ExpertLayout, modules: list[str]) -> list[str]:
    """A fused name (`gate_up_proj`, `experts.down_proj`, `mlp.experts.gate_up_proj`, `experts`) as the stored
    per-expert suffixes (`experts.0.gate_proj`, ...); a name that is none of these comes back as it is."""
    m = re.fullmatch(r"(?P<head>(?:.+\.)?)experts(?:\.(?P<tail>\w+))?|(?P<bare>\w+)", target)
    head, tail = (m["head"] or "", m["tail"] or m["bare"] or "") if m else ("", target)
    if m is None or (tail and tail not in layout.pieces):
        return [target]
    head = re.sub(rf"(^|\.){re.escape(layout.block)}\.$", rf"\g<1>{layout.stored_block}.", head)
    pieces = layout.pieces[tail] if tail else layout.piece_names()
    count = 1 + max((p[1] for n in modules if (p := split_name(n, layout))), default=-1)
    return [f"{head}experts.{e}.{p}" for e in range(count) for p in pieces] or [target]


def check_expert_jobs(
    config: dict,
    modules: list[str],
    *,
    dora: bool,
    quantize: str | None,
    needs_data: bool,
    no_residual: bool,
    offsets_base: bool,
) -> None:
    """Refuse, before anything is written, what an expert LoRA cannot be: some pieces of a fused parameter without
    the others, DoRA or NF4 on experts (PEFT adapts fused expert parameters with plain LoRA only), calibration data
    per expert, training on the original with the initial product subtracted.

    Raises:
        TargetError, OptionError: naming the option and what works instead.
    """
    layout = layout_of(config)
    experts = {m: p for m in modules if layout and (p := split_name(m, layout))}
    if not experts:
        return
    chosen = set(experts)
    for prefix, e, piece in experts.values():
        group = layout.pieces[layout.fused_of(piece)]
        missing = [p for p in group if f"{prefix}.{layout.stored_block}.experts.{e}.{p}" not in chosen]
        if missing:
            raise TargetError(
                f"{{targets}}: {piece} without {', '.join(missing)}: transformers holds an expert's "
                f"{' and '.join(group)} in one fused parameter {layout.fused_of(piece)}, which PEFT "
                f"adapts whole; target {layout.fused_of(piece)} (or all of {', '.join(group)})"
            )
    for flag, on, why in (
        ("dora", dora, "PEFT's LoRA on fused expert parameters has no DoRA"),
        ("quantize", quantize, "bitsandbytes quantises linear layers, not fused expert parameters"),
        (
            "data",
            needs_data,
            "per-expert calibration needs the tokens routed to each expert, which "
            "this tool does not record; use pissa, milora, ailora or lora",
        ),
        (
            "no_residual",
            no_residual and offsets_base,
            "training on the original subtracts s·B0·A0 "
            "per linear layer, which fused experts have "
            "not; decompose with a residual",
        ),
    ):
        if on:
            raise OptionError(f"{{{flag}}}: not with expert targets ({next(iter(experts))}): {why}")
