"""PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]). DoRA adapters
(`use_dora: true`) add `base_model.model.<module>.lora_magnitude_vector` ([out]) per module, read into
`Adapter.magnitudes` (the maths is in `init.dora`). Modules trained whole (`modules_to_save`, e.g. a classification
head) are saved as PEFT saves them: their plain parameter names, `base_model.model.classifier.weight`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..architectures import auto_class
from ..distributed import full_tensor, shard_like
from ..errors import FormatError, InputNotFoundError, UnsupportedError
from .nf4_layout import STATE as NF4_STATE
from .tensorio import load_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
#: parameter names inside a live PEFT model (adapter name included)
_LIVE_LORA = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.[^.]+\.weight$")
_MAGNITUDE = re.compile(r"^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_LIVE_MAGNITUDE = re.compile(r"^base_model\.model\.(.+)\.lora_magnitude_vector\.[^.]+\.weight$")
_LIVE_SAVED = re.compile(r"^base_model\.model\.(.+)\.modules_to_save\.[^.]+\.(.+)$")


@dataclass
class Adapter:
    """A LoRA adapter in memory: its config, per module (A [r, in], B [out, r]), and the `modules_to_save`
    parameters by name (`extra`, e.g. "classifier.weight"); for DoRA, per module the magnitude vector m [out]
    (`magnitudes`, empty for a plain LoRA)."""

    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)

    def scale(self, module: str) -> float:
        """s for one module, honouring rank_pattern, alpha_pattern and use_rslora as PEFT does."""
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module, c["r"])
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c["lora_alpha"])
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def check_fits(
        self, tensors: dict, *, adapter: object, base: object, config: dict | None = None, takes_nf4: bool = False
    ) -> dict[str, str]:
        """Every adapted module exists in the base (`tensors`: name -> TensorInfo) with a matching float shape.

        A base weight stored NF4-packed (decompose --quantize) fits when its element count does, for callers that
        `takes_nf4` (train); the others refuse it (merge reads such a base through `adapters.nf4_residual.float_view`).

        Module names may differ from the base's tensor names by the base model prefix (`model_names.match`, with
        the base's `config`): an adapter for BertForSequenceClassification fits a bare BertModel checkpoint. An
        expert of a checkpoint that stores its experts fused (GPT-OSS) fits its slice of the 3-D tensor
        (`experts.expert_slices`).

        Returns:
            module -> the name of its weight tensor in the base (an expert slice's: the 3-D tensor's).

        Raises:
            TargetError: a module the base lacks, or a shape that does not fit, naming both sides.
            UnsupportedError: a base weight whose dtype is not a float type.
        """
        from ..architectures import match
        from ..errors import TargetError
        from ..experts import expert_slices
        from .tensorio import FLOAT_DTYPES

        parts = expert_slices(tensors, config or {})
        plain = {m: f for m, f in self.factors.items() if m not in parts}
        found = match(plain, {n[: -len(".weight")] for n in tensors if n.endswith(".weight")}, config=config)
        weights = {
            **{m: w + ".weight" for m, w in found.items()},
            **{m: p.tensor for m, p in parts.items() if m in self.factors},
        }
        for m, (A, B) in self.factors.items():
            info = tensors.get(weights[m]) if m in weights else None
            if info is None:
                near = sorted(n for n in tensors if n.endswith(m.rsplit(".", 1)[-1] + ".weight"))[:3]
                raise TargetError(
                    f"{adapter}: adapts module {m!r} but the base {base} has no tensor {m}.weight"
                    + (f" (it has e.g. {', '.join(near)})" if near else "")
                    + "; pass the base this adapter was trained on"
                )
            shape = (B.shape[0], A.shape[1])
            if f"{info.name}.{NF4_STATE}" in tensors:
                if not takes_nf4:
                    raise UnsupportedError(
                        f"{base}: {info.name} is NF4-quantised (decompose --quantize); this command "
                        "takes float weights (train, convert, merge and export-base take an NF4 "
                        "residual): decompose without --quantize"
                    )
                if info.shape[0] != -(-shape[0] * shape[1] // 2):
                    raise TargetError(
                        f"{adapter}: {m} is {shape[0]}x{shape[1]} in the adapter but the NF4 weight "
                        f"{info.name} in {info.file} holds {info.shape[0]} bytes; pass the matching base"
                    )
                continue
            held, fits = (
                (parts[m].shape, shape) if m in parts else (tuple(info.shape), _stored_shape(shape, self.config))
            )
            if held != fits:
                where = f"its slice of {info.name}" if m in parts else info.name
                raise TargetError(
                    f"{adapter}: {m} is {shape[0]}x{shape[1]} in the adapter but {where} in "
                    f"{info.file} is {held[0]}x{held[1]}; pass the matching base"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(
                    f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; supported: {', '.join(FLOAT_DTYPES)}"
                )
        return weights

    def delta(self, module: str) -> torch.Tensor:
        """s·B·A in float32, shaped like the module's weight ([out, in]; [in, out] for fan_in_fan_out)."""
        A, B = self.factors[module]
        d = self.scale(module) * (B.float() @ A.float())
        return d.T if self.config.get("fan_in_fan_out") else d


def _stored_shape(shape: tuple[int, int], config: dict) -> tuple[int, int]:
    """How a weight of `shape` [out, in] is stored for an adapter of `config`: [in, out] with fan_in_fan_out."""
    return shape[::-1] if config.get("fan_in_fan_out") else shape


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_config(
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    rslora: bool,
    base: str,
    task_type: str | None,
    fan_in_fan_out: bool = False,
    modules_to_save: list[str] | None = None,
    dora: bool = False,
) -> dict:
    """An adapter_config.json for a plain LoRA that PEFT and vLLM load without re-initialising it (`dora`: a DoRA
    adapter, `use_dora: true`, which PEFT loads and vLLM does not)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted(set(targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "use_dora": dora,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def with_ranks(config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict]:
    """(`config`, `factors`) for factors whose ranks differ by module (EVA's), as PEFT's EVA writes them: `rank_pattern`
    for each module of rank ≠ r, `alpha_pattern` α·rₘ/r (without rsLoRA its scale α/r unchanged), and the modules of
    rank 0 left out (and `target_modules` then the full names of the others, so that PEFT adapts none of them)."""
    r, alpha = config["r"], config["lora_alpha"]
    kept = {m: f for m, f in factors.items() if f[0].shape[0] > 0}
    ranks = {m: A.shape[0] for m, (A, _) in kept.items() if A.shape[0] != r}
    targets = sorted(kept) if len(kept) < len(factors) else config["target_modules"]
    alphas = {m: alpha * k / r for m, k in ranks.items()}
    return {**config, "target_modules": targets, "rank_pattern": ranks, "alpha_pattern": alphas}, kept


def model_class(task: str | None, config=None):
    """The transformers class an adapter of PEFT task type `task` applies to: the task's Auto class, else the
    class config.json's `architectures` names, else AutoModel."""
    import transformers

    name = auto_class(task)
    named = (getattr(config, "architectures", None) or [None])[0]
    if name is None and named and hasattr(transformers, named):
        return getattr(transformers, named)
    return getattr(transformers, name or "AutoModel")


def key(module: str, which: str) -> str:
    """The safetensors key of a module's lora_A ("A") or lora_B ("B") weight."""
    return f"{PREFIX}{module}.lora_{which}.weight"


def write_adapter(
    directory: Path,
    config: dict,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, torch.Tensor] | None = None,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write weights, then config, each beside its name and renamed into place; return both paths.

    `extra`: the `modules_to_save` parameters by name ("classifier.weight"), which `config` must list.
    `magnitudes`: DoRA's magnitude vector per module (`config` must say `use_dora: true`), saved as PEFT does.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in sorted(factors.items()):
        tensors[key(module, "A")] = A.to(dtype).contiguous()
        tensors[key(module, "B")] = B.to(dtype).contiguous()
    for module, m in sorted((magnitudes or {}).items()):
        tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = m.to(dtype).contiguous()
    for name, t in sorted((extra or {}).items()):
        tensors[PREFIX + name] = t.to(dtype).contiguous()
    weights, cfg = d / WEIGHTS_NAME, d / CONFIG_NAME
    save_file(tensors, str(d / f".{WEIGHTS_NAME}.partial"), metadata={"format": "pt"})
    os.replace(d / f".{WEIGHTS_NAME}.partial", weights)
    (d / f".{CONFIG_NAME}.partial").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(d / f".{CONFIG_NAME}.partial", cfg)
    return [weights, cfg]


def read_adapter(directory: Path | str, *, strict: bool = True, dora: bool = False) -> Adapter:
    """Load an adapter directory (safetensors only; pickled adapter_model.bin is refused).

    `strict` refuses DoRA unless `dora` (the caller applies the magnitude vectors: train, merge, convert --dora);
    `check` reads leniently. A DoRA adapter's magnitudes land in `Adapter.magnitudes`, one per module.

    Raises:
        InputNotFoundError, FormatError, UnsupportedError: naming the file and what to do.
    """
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise InputNotFoundError(f"{d}: no {CONFIG_NAME}; pass a PEFT adapter directory")
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise UnsupportedError(f"{d}: adapter_model.bin is pickled; re-save it with safe_serialization=True")
        raise InputNotFoundError(f"{d}: no {WEIGHTS_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise UnsupportedError(
            f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    if strict and config.get("use_dora") and not dora:
        raise UnsupportedError(
            f"{cfg_path}: a DoRA adapter (use_dora: true) needs its base: `ailora-tools merge` it, "
            "or `ailora-tools convert --dora exact|approximate` it to a standard LoRA first"
        )
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    mags: dict[str, torch.Tensor] = {}
    saved = [str(s) for s in config.get("modules_to_save") or []]
    for k, t in load_tensors(w_path).items():
        if config.get("use_dora") and (mm := _MAGNITUDE.match(k)) is not None:
            mags[mm.group(1)] = t
            continue
        m = _KEY.match(k)
        if m is None and k.startswith(PREFIX) and _in_modules(k[len(PREFIX) :], saved):
            extra[k[len(PREFIX) :]] = t
            continue
        if m is None and not strict:
            continue
        if m is None:
            raise FormatError(
                f"{w_path}: tensor {k!r} is not a LoRA A/B weight (e.g. {key('x.q_proj', 'A')}) "
                "nor a parameter of a module in modules_to_save"
            )
        (A if m.group(2) == "A" else B)[m.group(1)] = t
    if set(A) != set(B):
        raise FormatError(f"{w_path}: modules with only one of lora_A/lora_B: {sorted(set(A) ^ set(B))}")
    factors = {}
    for m in sorted(A):
        if A[m].ndim != 2 or B[m].ndim != 2 or A[m].shape[0] != B[m].shape[1]:
            raise FormatError(f"{w_path}: {m}: lora_A {tuple(A[m].shape)} and lora_B {tuple(B[m].shape)} do not chain")
        factors[m] = (A[m], B[m])
    if config.get("use_dora") and strict:
        for m, (_A, B_) in factors.items():
            if m not in mags or tuple(mags[m].shape) != (B_.shape[0],):
                raise FormatError(
                    f"{w_path}: DoRA module {m} has no lora_magnitude_vector of shape [{B_.shape[0]}] "
                    f"(found {tuple(mags[m].shape) if m in mags else 'none'}); pass a complete "
                    "DoRA adapter"
                )
    return Adapter(config, factors, extra, mags)


def adapter_of(model, config: dict) -> Adapter:
    """The LoRA factors and modules_to_save parameters of a live PEFT model (float32, on the CPU), with `config`.
    A model sharded by `train --fsdp`: every rank calls this (the tensors are gathered)."""
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    mags: dict[str, torch.Tensor] = {}
    wrapped, experts = _live_experts(model)
    for name, p in model.named_parameters():
        if (m := _LIVE_LORA.match(name)) is not None and m.group(1) in wrapped:
            continue
        if (m := _LIVE_LORA.match(name)) is not None:
            (A if m.group(2) == "A" else B)[m.group(1)] = full_tensor(p.detach()).float().cpu()
        elif (m := _LIVE_MAGNITUDE.match(name)) is not None:
            mags[m.group(1)] = full_tensor(p.detach()).float().cpu()
        elif (m := _LIVE_SAVED.match(name)) is not None:
            extra[f"{m.group(1)}.{m.group(2)}"] = full_tensor(p.detach()).float().cpu()
    return Adapter(config, {**{m: (A[m], B[m]) for m in A}, **experts}, extra, mags)


def _live_experts(model, factors: dict | None = None) -> tuple[set[str], dict]:
    """A live model's expert LoRA (`experts`: PEFT's fused `target_parameters`): (the wrappers' module names, their
    factors per expert); with `factors`, copy those in instead and return the modules used."""
    from ..experts import live_factors, load_live, wrappers

    if not wrappers(model):
        return set(), {} if factors is None else set()
    config = model.config.to_dict()
    if factors is None:
        return live_factors(model, config, "default")
    return load_live(model, config, factors, "default")


def load_into(model, adapter: Adapter, *, source: object, extra: bool = True) -> None:
    """Copy `adapter`'s factors (and, with `extra`, its modules_to_save parameters) into a live PEFT model.

    Every LoRA factor of the model must get a value and every factor of the adapter must be used, so that no
    module silently keeps PEFT's own initialisation.

    Raises:
        FormatError: a module on one side only, naming it and `source`.
    """
    try:
        wrapped, used = _live_experts(model, adapter.factors)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{source}: does not fit the model's fused expert parameters ({e})") from e
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (m := _LIVE_LORA.match(name)) is not None and m.group(1) in wrapped:
                continue
            if (m := _LIVE_LORA.match(name)) is not None:
                if m.group(1) not in adapter.factors:
                    raise FormatError(f"{source}: has no factors for module {m.group(1)!r} of the model")
                p.copy_(shard_like(p, adapter.factors[m.group(1)][0 if m.group(2) == "A" else 1]))
                used.add(m.group(1))
            elif (m := _LIVE_MAGNITUDE.match(name)) is not None:  # DoRA: else PEFT's own m (of W + s·B·A at wrap time)
                if m.group(1) not in adapter.magnitudes:
                    raise FormatError(f"{source}: has no DoRA magnitude vector for module {m.group(1)!r} of the model")
                p.copy_(shard_like(p, adapter.magnitudes[m.group(1)]))
            elif extra and (m := _LIVE_SAVED.match(name)) is not None:
                if (k := f"{m.group(1)}.{m.group(2)}") not in adapter.extra:
                    raise FormatError(f"{source}: has no tensor {k!r} for the model's modules_to_save")
                p.copy_(shard_like(p, adapter.extra[k]))
    if set(adapter.factors) - used:
        raise FormatError(
            f"{source}: adapts modules the model does not have: {sorted(set(adapter.factors) - used)[:3]}"
        )


def _in_modules(name: str, modules: list[str]) -> bool:
    """Whether parameter `name` belongs to a module PEFT's modules_to_save rule (name suffix) selects."""
    parts = name.split(".")
    return any(".".join(parts[:i]).endswith(m) for i in range(1, len(parts)) for m in modules)
