"""Which modules are targets, what role each gets, and what each architecture calls them.

Name mapping is data: one `Architecture` entry per model family, looked up by config `model_type`.
A module is a target when its name equals a target name or ends with "." + it (PEFT's rule); `all-linear` (PEFT's
shortcut) is every linear layer but the output head. A Llama-style name for part of a fused matrix (`q_proj` on
Phi-3's `qkv_proj`) is refused, naming the fused module: one LoRA pair adapts a whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..architectures import linear_layers, match
from ..errors import TargetError
from ..io.tensorio import TensorInfo

PRINCIPAL, MINOR = "principal", "minor"
ROLES = (PRINCIPAL, MINOR)
#: a fused Q/K/V matrix under AILoRA: its Q rows principal, its V rows minor, K's initial product zero (`init.fused`)
SPLIT = "principal+minor"
#: PEFT's target shortcut: every linear layer except the output head
ALL_LINEAR = "all-linear"
#: fused projections across architectures: name -> what it holds
FUSED = {
    "c_attn": "Q, K and V",
    "query_key_value": "Q, K and V",
    "qkv_proj": "Q, K and V",
    "Wqkv": "Q, K and V",
    "W_pack": "Q, K and V",
    "qkv": "Q, K and V",
    "gate_up_proj": "gate and up",
    "Wi": "the GLU's input and gate",
}


@dataclass(frozen=True)
class Architecture:
    """Module names of one model family (suffixes, PEFT's rule). `aliases` maps Llama-style names to this family's
    names for the same matrix; `parts` maps them to the fused matrix that holds them with others (refused as targets);
    `fused` maps a fused Q/K/V matrix to its row layout (`init.fused.LAYOUTS`)."""

    name: str
    query: tuple[str, ...] = ("q_proj",)
    key: tuple[str, ...] = ("k_proj",)
    value: tuple[str, ...] = ("v_proj",)
    output: tuple[str, ...] = ("o_proj",)
    aliases: dict[str, str] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)
    #: Conv1D modules that store W transposed ([in, out]); adapters need fan_in_fan_out
    transposed: tuple[str, ...] = ()


def _renamed(name: str, query: str, key: str, value: str, output: str, **aliases: str) -> Architecture:
    """A family whose Q, K and V are separate matrices under other names, which q_proj, k_proj and v_proj (and
    `aliases`) name."""
    aliases = {"q_proj": query, "k_proj": key, "v_proj": value, **aliases}
    return Architecture(name, query=(query,), key=(key,), value=(value,), output=(output,), aliases=aliases)


def _fused(name: str, qkv: str, layout: str, *parts: tuple[str, str], **names) -> Architecture:
    """A family whose Q, K and V are one matrix `qkv` with rows laid out as `layout`: no query, key or value names;
    q_proj, k_proj and v_proj (and `parts`: Llama-style name, fused matrix) are parts of a fused matrix."""
    parts = {**{k: qkv for k in ("q_proj", "k_proj", "v_proj")}, **dict(parts)}
    return Architecture(name, query=(), key=(), value=(), parts=parts, fused={qkv: layout}, **names)


LLAMA_LIKE = Architecture("llama-like")
BERT = _renamed("bert", "query", "key", "value", "attention.output.dense")
GPT2 = _fused(
    "gpt2",
    "c_attn",
    "thirds",
    output=("attn.c_proj",),
    aliases={"o_proj": "attn.c_proj", "up_proj": "c_fc", "down_proj": "mlp.c_proj"},
    transposed=("c_attn", "c_proj", "c_fc"),
)
GPT_NEOX = _fused(
    "gpt_neox",
    "query_key_value",
    "per-head",
    output=("attention.dense",),
    aliases={"o_proj": "attention.dense", "up_proj": "dense_h_to_4h", "down_proj": "dense_4h_to_h"},
)
PHI3 = _fused("phi3", "qkv_proj", "q-kv", ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"))
MODERNBERT = _fused(
    "modernbert",
    "Wqkv",
    "thirds",
    ("gate_proj", "Wi"),
    ("up_proj", "Wi"),
    output=("attn.Wo",),
    aliases={"o_proj": "attn.Wo", "down_proj": "mlp.Wo"},
)
T5 = _renamed("t5", "q", "k", "v", "o", o_proj="o")
#: model_type -> Architecture; anything absent is treated as Llama-like (q_proj / v_proj)
REGISTRY = {
    **{t: BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie")},
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "phi3": PHI3,
    "modernbert": MODERNBERT,
    **{t: T5 for t in ("t5", "mt5")},
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


def resolve_targets(
    targets: list[str],
    modules: list[str],
    arch: Architecture,
    *,
    linear: list[str] | None = None,
    config: dict | None = None,
) -> dict[str, str]:
    """Map each requested target to the name it has in this model (aliases applied); `all-linear` to each of
    `linear` (the model's linear layers but the output head) by its full name; without `linear`, to those of the
    class the model `config` names (`architectures.linear_layers`), as `modules` spells them.

    Raises:
        TargetError: a target matches no module (the message lists the module names that exist), names only part of
            a fused matrix (naming the fused module), or `all-linear` given with other targets.
    """
    if not targets:
        raise TargetError(
            "{targets}: no module names given; pass comma-separated module-name suffixes, e.g. "
            "{targets} q_proj,v_proj, or all-linear"
        )
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise TargetError(
                f"{{targets}}: {ALL_LINEAR} already names every linear layer; pass it alone (not with "
                f"{', '.join(t for t in targets if t != ALL_LINEAR)})"
            )
        if linear is None:
            linear = list(match(linear_layers(config or {}), set(modules), config=config).values())
        return {m: m for m in linear}
    resolved = {}
    for t in targets:
        name = t if any(matches(m, t) for m in modules) else arch.aliases.get(t, t)
        if not any(matches(m, name) for m in modules):
            if (whole := arch.parts.get(t)) and any(matches(m, whole) for m in modules):
                raise TargetError(
                    f"{{targets}}: {t!r} is part of the fused {whole} in this {arch.name} model ({whole} holds "
                    f"{FUSED.get(whole, 'several projections')} in one matrix), and one LoRA pair adapts a whole "
                    f"matrix; target {whole} instead (see docs/fused-projections.md)"
                )
            known = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise TargetError(
                f"{{targets}}: {t!r} matches no module of this {arch.name} model; "
                f"linear modules here end with: {', '.join(known)}"
            )
        resolved[t] = name
    return resolved


def assign_roles(
    method,
    targets: list[str],
    modules: list[str],
    arch: Architecture,
    overrides: dict[str, str],
    *,
    linear: list[str] | None = None,
    config: dict | None = None,
) -> dict[str, str | None]:
    """Give every matched module its role: principal, minor, SPLIT (a fused Q/K/V matrix under ailora) or None
    (methods without roles).

    `method` is an init method (`ailora_tools.init`): its `role_of(module, arch)` gives each target module's role
    and `needs_roles` says whether every module must have one. `overrides` maps a target/module suffix to a role
    (--role). `linear`, `config`: what `all-linear` stands for (`resolve_targets`).

    Raises:
        TargetError: a target that fits no module, an override that names no target, overrides for a method
            without roles, or a module without the role its method needs.
    """
    resolved = resolve_targets(targets, modules, arch, linear=linear, config=config)
    if overrides and not method.needs_roles:
        raise TargetError(
            f"{{roles}}: {method.name} gives its targets no roles; {{roles}} applies to ailora, pissa and milora"
        )
    for key, role in overrides.items():
        if role not in ROLES:
            raise TargetError(f"{{roles}} {key}={role}: role must be one of {', '.join(ROLES)}")
    roles = {m: method.role_of(m, arch) for m in modules if any(matches(m, name) for name in resolved.values())}
    for key, role in overrides.items():
        hit = [m for m in roles if matches(m, key) or matches(m, arch.aliases.get(key, key))]
        if not hit:
            raise TargetError(f"{{roles}} {key}={role}: {key!r} is not among the targets ({', '.join(targets)})")
        roles.update(dict.fromkeys(hit, role))
    for m, role in roles.items():
        if method.needs_roles and role is None:
            raise TargetError(
                f"{m}: {method.name} gives it no role; give it one with {{roles}} "
                f"{m.rsplit('.', 1)[-1]}=principal|minor (targets: {', '.join(targets)})"
            )
    return roles


def role_in_attention(module: str, arch: Architecture) -> str | None:
    """Which attention matrix `module` is in `arch`: "query", "key", "value", "output", "qkv" (fused) or None."""
    for what in ("query", "key", "value", "output"):
        if any(matches(module, n) for n in getattr(arch, what)):
            return what
    return "qkv" if any(matches(module, n) for n in arch.fused) else None


def is_transposed(module: str, arch: Architecture) -> bool:
    """True for Conv1D modules that store W as [in, out] (PEFT's fan_in_fan_out)."""
    return any(matches(module, t) for t in arch.transposed)
