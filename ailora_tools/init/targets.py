"""Which modules are targets, what role each gets, and what each architecture calls them.

Name mapping is data: one `Architecture` entry per model family, looked up by config `model_type`.
A module is a target when its name equals a target name or ends with "." + it (PEFT's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TargetError, UnsupportedError
from ..io.tensorio import TensorInfo

PRINCIPAL, MINOR = "principal", "minor"
ROLES = (PRINCIPAL, MINOR)
#: fused projections across architectures: name -> what it holds
FUSED = {
    "c_attn": "Q, K and V", "query_key_value": "Q, K and V", "qkv_proj": "Q, K and V",
    "Wqkv": "Q, K and V", "W_pack": "Q, K and V", "qkv": "Q, K and V", "gate_up_proj": "gate and up",
}


@dataclass(frozen=True)
class Architecture:
    """Module names of one model family. `aliases` maps Llama-style names to this family's names."""

    name: str
    query: tuple[str, ...] = ("q_proj",)
    value: tuple[str, ...] = ("v_proj",)
    aliases: dict[str, str] = field(default_factory=dict)
    #: Conv1D modules that store W transposed ([in, out]); adapters need fan_in_fan_out
    transposed: tuple[str, ...] = ()


LLAMA_LIKE = Architecture("llama-like")
BERT = Architecture(
    "bert", query=("query",), value=("value",),
    aliases={"q_proj": "query", "k_proj": "key", "v_proj": "value"},
)
GPT2 = Architecture(
    "gpt2", query=(), value=(),
    aliases={"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj"},
    transposed=("c_attn", "c_proj", "c_fc"),
)
GPT_NEOX = Architecture(
    "gpt_neox", query=(), value=(),
    aliases={"q_proj": "query_key_value", "k_proj": "query_key_value", "v_proj": "query_key_value"},
)
PHI3 = Architecture("phi3", query=(), value=(),
                    aliases={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"})
#: model_type -> Architecture; anything absent is treated as Llama-like (q_proj / v_proj)
REGISTRY = {
    **{t: BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie")},
    "gpt2": GPT2, "gpt_neox": GPT_NEOX, "phi3": PHI3,
}


def architecture(config: dict) -> Architecture:
    """The module-name table for a model config (by `model_type`)."""
    return REGISTRY.get(config.get("model_type", ""), LLAMA_LIKE)


def linear_modules(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Module name -> weight tensor, for every 2-D `*.weight` (embeddings excluded by name)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and len(t.shape) == 2 and "embed" not in name and "wte" not in name:
            out[name[: -len(".weight")]] = t
    return out


def matches(module: str, target: str) -> bool:
    """PEFT's suffix rule: the module is the target, or ends with '.target'."""
    return module == target or module.endswith("." + target)


def target_names(targets) -> list[str]:
    """Module-name suffixes as a list: a string is comma-separated ("q_proj,v_proj"), blanks dropped."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t.strip()]


def resolve_targets(targets: list[str], modules: list[str], arch: Architecture) -> dict[str, str]:
    """Map each requested target to the name it has in this model (aliases applied).

    Raises:
        TargetError: a target matches no module; the message lists the module names that exist.
    """
    if not targets:
        raise TargetError("{targets}: no module names given; pass comma-separated module-name suffixes, e.g. "
                          "{targets} q_proj,v_proj")
    resolved = {}
    for t in targets:
        name = t if any(matches(m, t) for m in modules) else arch.aliases.get(t, t)
        if not any(matches(m, name) for m in modules):
            known = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise TargetError(
                f"{{targets}}: {t!r} matches no module of this {arch.name} model; "
                f"linear modules here end with: {', '.join(known)}"
            )
        resolved[t] = name
    return resolved


def assign_roles(method, targets: list[str], modules: list[str], arch: Architecture,
                 overrides: dict[str, str]) -> dict[str, str | None]:
    """Give every matched module its role: principal, minor, or None (methods without roles).

    `method` is an init method (`ailora_tools.init`): its `role_of(target, name, arch)` gives each requested
    target's role and `needs_roles` says whether every module must have one. `overrides` maps a
    target/module suffix to a role (--role).

    Raises:
        TargetError: an override names no target, overrides for a method without roles, or a module without
            the role its method needs.
        UnsupportedError: roles that differ inside one fused projection.
    """
    resolved = resolve_targets(targets, modules, arch)
    if overrides and not method.needs_roles:
        raise TargetError(f"{{roles}}: {method.name} gives its targets no roles; {{roles}} applies to ailora, pissa "
                          "and milora")
    for key, role in overrides.items():
        if role not in ROLES:
            raise TargetError(f"{{roles}} {key}={role}: role must be one of {', '.join(ROLES)}")
    wanted: dict[str, list[tuple[str, str | None]]] = {}  # module -> [(requested target, role)]
    for t, name in resolved.items():
        for m in modules:
            if matches(m, name):
                wanted.setdefault(m, []).append((t, method.role_of(t, name, arch)))
    for key, role in overrides.items():
        hit = [m for m in wanted if matches(m, key) or matches(m, resolved.get(key, key))]
        if not hit:
            raise TargetError(f"{{roles}} {key}={role}: {key!r} is not among the targets ({', '.join(targets)})")
        for m in hit:
            wanted[m] = [(key, role)]
    roles: dict[str, str | None] = {}
    for m, asked in wanted.items():
        distinct = {r for _, r in asked}
        suffix = m.rsplit(".", 1)[-1]
        if len(distinct) > 1:
            raise UnsupportedError(
                f"{m} is a fused projection holding {FUSED.get(suffix, 'several projections')} in one matrix "
                f"(asked for as {', '.join(t for t, _ in asked)}), so one LoRA pair cannot give them different roles "
                f"({', '.join(f'{t}={r}' for t, r in asked)}). Use {{method}} pissa or milora, or give the "
                f"whole matrix one role explicitly with {{roles}} {suffix}=principal|minor"
            )
        role = distinct.pop()
        if method.needs_roles and role is None:
            raise TargetError(
                f"ailora gives query projections ({', '.join(arch.query) or 'none here'}) the principal role and "
                f"value projections ({', '.join(arch.value) or 'none here'}) the minor role; {m} has neither. "
                f"Give it one with {{roles}} {suffix}=principal|minor (targets: {', '.join(targets)})"
            )
        roles[m] = role
    return roles


def is_transposed(module: str, arch: Architecture) -> bool:
    """True for Conv1D modules that store W as [in, out] (PEFT's fan_in_fan_out)."""
    return any(matches(module, t) for t in arch.transposed)
