"""Every on-disk output name, its readers, and the identity each output carries: which base an adapter belongs to.

decompose subtracts s·B0·A0 from each target, so its adapter (and every adapter trained from it) applies
to OUT/residual, not to the original model; plain LoRA adapters and converted ones apply to the original.
Used on the wrong base, an adapter still loads and gives a model that is off: no error anywhere, only wrong
logits. So every adapter-bearing manifest (decompose's ailora.json, ailora-train.json, ailora-convert.json) holds an
`applies_to` block:

    {"kind": "residual" | "original", "model": path or Hub id, "samples": {tensor: fingerprint},
     "original": {"model", "samples"}, "residual": {"model", "samples"} | null}

`model`/`samples` are those of the base the adapter applies to; `original` and `residual` name both bases of the
decomposition it came from, so that a wrong base is named for what it is. A fingerprint is BLAKE3 of a tensor's
first 64 KiB as stored: two models of equal shapes (a second random init, another fine-tune) differ in it, so a
model directory is recognised wherever it was moved, and another model with the same shapes is refused.
`base_of` reads the block for any adapter directory (`read_manifest` upgrades an older manifest first);
`check_base` checks a Checkpoint against it. A PEFT adapter without an ailora-tools manifest is not checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError
from .io.fingerprints import fingerprints, pick, stored_sample
from .io.output import MANIFEST_SCHEMA

DECOMPOSE_MANIFEST, TRAIN_MANIFEST, CONVERT_MANIFEST = "ailora.json", "ailora-train.json", "ailora-convert.json"
MERGE_MANIFEST, SPECTRUM_MANIFEST, COMPARE_MANIFEST = "ailora-merge.json", "spectrum.json", "compare.json"
#: every output's manifest, written last (a directory without one is not complete); `verify` knows them all
#: `train --bitfit`'s output: trained bias terms (and a classification head), no adapter (`training.bitfit`)
BITFIT_MANIFEST = "ailora-bitfit.json"
#: `export-base`'s output: a quantised residual re-quantised for a server, and its adapter (`adapters.server_base`)
EXPORT_BASE_MANIFEST = "ailora-export-base.json"
MANIFESTS = (
    DECOMPOSE_MANIFEST,
    MERGE_MANIFEST,
    CONVERT_MANIFEST,
    TRAIN_MANIFEST,
    SPECTRUM_MANIFEST,
    COMPARE_MANIFEST,
    BITFIT_MANIFEST,
    EXPORT_BASE_MANIFEST,
)
#: a decompose output's two directories; `convert --dora exact` writes DORA_BASE_DIR and ADAPTER_DIR
RESIDUAL_DIR, ADAPTER_DIR, DORA_BASE_DIR = "residual", "adapter", "base"
#: train's checkpoints (`training.checkpointer`): step-N/ each, recorded in the manifest's files["checkpoints"]
CKPT_DIR = "checkpoints"
RESIDUAL, ORIGINAL = "residual", "original"
#: decompose's manifest key of `--no-offset`: the base was left as it is and training does not subtract s·B0·A0
NO_OFFSET = "no_offset"
#: decompose's manifest key of the factors that stay frozen in training (MiCA: ["lora_B"]; `init.InitMethod.frozen`)
FROZEN = "frozen"


@dataclass
class BaseOf:
    """The base an adapter applies to: RESIDUAL, ORIGINAL or None (no manifest says), and how to recognise it."""

    kind: str | None
    #: trained with the initial product subtracted inside (train's exact mode): only `convert` gives a LoRA
    offset: bool = False
    method: str | None = None  # decompose's init method
    residual: str | None = None  # where decompose wrote the residual
    original: str | None = None  # the model decompose read
    #: ORIGINAL / RESIDUAL -> {tensor: fingerprint} of that base (empty when unknown)
    samples: dict[str, dict[str, str]] = field(default_factory=dict)
    manifest: str | None = None  # the manifest that says so

    @property
    def model(self) -> str | None:
        """The base the adapter applies to."""
        return self.residual if self.kind == RESIDUAL else self.original

    def block(self) -> dict | None:
        """This identity as the `applies_to` block of a manifest (None when the base is unknown)."""
        if self.kind is None:
            return None
        part = {
            k: {"model": m, "samples": self.samples.get(k, {})}
            for k, m in ((ORIGINAL, self.original), (RESIDUAL, self.residual))
        }
        return {
            "kind": self.kind,
            "model": self.model,
            "samples": self.samples.get(self.kind, {}),
            "original": part[ORIGINAL],
            "residual": part[RESIDUAL] if self.residual else None,
        }

    @classmethod
    def from_block(cls, block: dict, *, root: Path | None = None, **kw) -> BaseOf:
        """From an `applies_to` block; a relative model path is relative to `root` (decompose's own residual)."""
        samples = {k: (block.get(k) or {}).get("samples") or {} for k in (ORIGINAL, RESIDUAL)}
        samples[block["kind"]] = block.get("samples") or samples[block["kind"]]
        residual = (block.get(RESIDUAL) or {}).get("model")
        if residual is not None and root is not None and not Path(residual).is_absolute():
            residual = str(root / residual)
        return cls(
            block["kind"], residual=residual, original=(block.get(ORIGINAL) or {}).get("model"), samples=samples, **kw
        )


def decompose_identity(modules: dict[str, dict], *, original: str, residual: str | None, kind: str) -> dict:
    """The `applies_to` block of decompose's adapter, from its per-module manifest stats; `residual` relative to the
    output directory ("residual"), so that the manifest does not depend on where the output lies."""
    chosen = pick(s["tensor"] for s in modules.values() if "source_sample" in s)
    by_tensor = {s["tensor"]: s for s in modules.values()}
    samples = {ORIGINAL: {t: by_tensor[t]["source_sample"] for t in chosen}}
    if residual is not None:
        samples[RESIDUAL] = {t: by_tensor[t]["residual_sample"] for t in chosen if "residual_sample" in by_tensor[t]}
    return BaseOf(kind, residual=residual, original=original, samples=samples).block()


def trained_identity(initial: str | os.PathLike, ckpt, kind: str, *, forced: bool = False) -> dict:
    """The `applies_to` block of an adapter trained from `initial` on `ckpt` as base `kind` (RESIDUAL/ORIGINAL):
    the base it was trained on, with the other base of its decomposition when the initial adapter's manifest
    names it."""
    meant = base_of(initial)
    tensors = list(meant.samples.get(meant.kind or "", {})) or None
    here = fingerprints(ckpt, tensors)
    path = ckpt.name_or_path
    known = meant if meant.kind is not None else BaseOf(kind)
    samples = {**known.samples, kind: here}
    original, residual = (path, known.residual) if kind == ORIGINAL else (known.original, path)
    if forced or (kind == ORIGINAL and known.kind == RESIDUAL):  # forced onto another base: the recorded
        original, residual = (path, None) if kind == ORIGINAL else (None, path)  # bases say nothing of it
        samples = {kind: here}
    return BaseOf(kind, residual=residual, original=original, samples=samples).block()


def converted_identity(trained: str | os.PathLike, initial: str | os.PathLike) -> dict | None:
    """The `applies_to` block of `convert`'s LoRA: the original model of the trained (or initial) adapter."""
    for source in (trained, initial):
        meant = base_of(source)
        if meant.kind is not None and (meant.original or meant.samples.get(ORIGINAL)):
            return BaseOf(ORIGINAL, original=meant.original, residual=meant.residual, samples=meant.samples).block()
    return None


def base_of(adapter: str | os.PathLike) -> BaseOf:
    """What the manifests beside `adapter` say about its base (decompose's adapter/, a trained or converted one)."""
    d = Path(adapter)
    if d.name == ADAPTER_DIR and read_manifest(d.parent / CONVERT_MANIFEST).get("dora") == "exact":
        d = d.parent  # `convert --dora exact`: OUT/adapter applies to OUT/base, as OUT/ailora-convert.json records
    if (d / CONVERT_MANIFEST).is_file():
        m = read_manifest(d / CONVERT_MANIFEST)
        # a converted LoRA applies to the original (a plain PEFT LoRA's conversion records no fingerprints)
        return (
            BaseOf.from_block(m["applies_to"], manifest=str(d / CONVERT_MANIFEST))
            if m.get("applies_to")
            else BaseOf(ORIGINAL, manifest=str(d / CONVERT_MANIFEST))
        )
    if (d / BITFIT_MANIFEST).is_file():  # trained biases: they belong to the model they were trained in
        m = read_manifest(d / BITFIT_MANIFEST)
        where = str(d / BITFIT_MANIFEST)
        return BaseOf.from_block(m["applies_to"], manifest=where) if m.get("applies_to") else BaseOf(None)
    if (d / TRAIN_MANIFEST).is_file():
        trained = read_manifest(d / TRAIN_MANIFEST)
        initial = base_of(trained.get("initial_adapter", "")) if trained.get("initial_adapter") else BaseOf(None)
        kind = trained.get("adapter_base", initial.kind)
        method = trained.get("method", initial.method)
        offset = kind == ORIGINAL and trained.get("mode") == "exact" and method not in (None, "lora")
        where = str(d / TRAIN_MANIFEST)
        if trained.get("applies_to"):
            return BaseOf.from_block(trained["applies_to"], offset=offset, method=method, manifest=where)
        return BaseOf(kind, offset, method, initial.residual, initial.original, initial.samples, where)
    if (d.parent / DECOMPOSE_MANIFEST).is_file():
        m = read_manifest(d.parent / DECOMPOSE_MANIFEST)
        return (
            BaseOf.from_block(
                m["applies_to"], root=d.parent, method=m.get("method"), manifest=str(d.parent / DECOMPOSE_MANIFEST)
            )
            if m
            else BaseOf(None)
        )
    return BaseOf(None)


def recognise(ckpt, meant: BaseOf) -> str | None:
    """Which base of `meant`'s decomposition `ckpt` is: RESIDUAL, ORIGINAL, or None (neither, or nothing to tell by).
    Tensor names are matched whatever base model prefix either side carries."""
    from .architectures import match

    for kind in (meant.kind, ORIGINAL if meant.kind == RESIDUAL else RESIDUAL):
        recorded = meant.samples.get(kind) or {}
        names = match(recorded, ckpt.tensors, config=ckpt.config) if recorded else {}
        if names and all(stored_sample(ckpt, names[t]) == s for t, s in recorded.items() if t in names):
            return kind
    return None


def base_problem(adapter: str | os.PathLike, ckpt, *, flag: str = "--base", meant: BaseOf | None = None) -> str | None:
    """Why `ckpt` is not the base `adapter` was made for (one line naming both and what to pass), or None when it
    is, or when nothing records which base that is (a PEFT adapter without an ailora-tools manifest). `meant`: the
    identity to check against, when not the one `adapter`'s manifests record (convert's original model)."""
    meant = meant or base_of(adapter)
    if meant.kind is None or not meant.samples.get(meant.kind):
        return None
    found = recognise(ckpt, meant)
    if found == meant.kind:
        return None
    if meant.kind == RESIDUAL and found == ORIGINAL:
        return (
            f"{adapter} applies to the residual {meant.residual} (decompose subtracted the initial product from "
            f"the weights), but {flag} {ckpt.source} is the original model: the result would be off by s·B0·A0. "
            f"Pass {flag} {meant.residual}, or run `ailora-tools convert` first to get a LoRA for the "
            "original model"
        )
    if meant.kind == ORIGINAL and (found == RESIDUAL or _residual_of(ckpt, meant)):
        return (
            f"{adapter} applies to the original model {meant.original}, but {flag} {ckpt.source} is a residual "
            f"decompose wrote from it: pass {flag} {meant.original}"
        )
    what = describe(ckpt)
    todo = f"pass {flag} {meant.model}" + (
        f" (or run `ailora-tools convert` and use the LoRA on the original {meant.original})"
        if meant.kind == RESIDUAL
        else ""
    )
    return (
        f"{adapter} applies to the {meant.kind} {meant.model}"
        + (f" of {meant.original}" if meant.kind == RESIDUAL and meant.original else "")
        + f", but {flag} {ckpt.source} is {what} (its weights differ from the fingerprints "
        f"{Path(meant.manifest).name} "
        f"records): {todo}; if it is that model saved again (another dtype or format), pass --force"
    )


def check_base(adapter: str | os.PathLike, ckpt, *, flag: str = "--base", force: bool = False) -> str | None:
    """Refuse to apply `adapter` to `ckpt` unless `ckpt` is the base its manifests record (`base_problem`).

    With `force`, return the problem instead (None when there is none), for a warning in the output's manifest.

    Raises:
        TargetError: naming the adapter, the base given, the base it belongs to, and what to pass.
    """
    _refuse_offset(adapter, base_of(adapter))
    problem = base_problem(adapter, ckpt, flag=flag)
    if problem is not None and not force:
        raise TargetError(problem)
    return problem


def base_problem_dir(
    adapter: str | os.PathLike, base: str | os.PathLike, *, flag: str = "--base", meant: BaseOf | None = None
) -> str | None:
    """`base_problem` for a base given as a directory that may hold only config.json (llama.cpp, serving checks):
    its weights are checked when it has them."""
    from .io.checkpoint import Checkpoint

    d = Path(base)
    if not (d.is_dir() and any(d.glob("*.safetensors"))):
        return None
    return base_problem(adapter, Checkpoint.open(d), flag=flag, meant=meant)


def check_base_dir(
    adapter: str | os.PathLike,
    base: str | os.PathLike,
    *,
    flag: str = "--base",
    force: bool = False,
    meant: BaseOf | None = None,
) -> str | None:
    """`check_base` for a base directory that may hold only config.json (`base_problem_dir`)."""
    problem = base_problem_dir(adapter, base, flag=flag, meant=meant)
    if problem is not None and not force:
        raise TargetError(problem)
    return problem


def describe(ckpt) -> str:
    """What a checkpoint is, for messages: a residual decompose wrote (and from which model), or another model."""
    root = Path(ckpt.root)
    if root.name == RESIDUAL_DIR and (root.parent / DECOMPOSE_MANIFEST).is_file():
        source = (read_manifest(root.parent / DECOMPOSE_MANIFEST).get("source") or {}).get("model")
        return f"the residual of another decomposition (of {source})"
    return "another model"


def _residual_of(ckpt, meant: BaseOf) -> bool:
    """Whether `ckpt` is a residual some decompose wrote from `meant`'s original model."""
    root = Path(ckpt.root)
    if root.name != RESIDUAL_DIR or not (root.parent / DECOMPOSE_MANIFEST).is_file():
        return False
    theirs = base_of(root.parent / ADAPTER_DIR).samples.get(ORIGINAL) or {}
    ours = meant.samples.get(ORIGINAL) or {}
    common = set(theirs) & set(ours)
    return bool(common) and all(theirs[t] == ours[t] for t in common)


def require_original(adapter: str | os.PathLike, what: str) -> None:
    """Refuse a residual-relative adapter where only the original base can be meant (serving, llama.cpp).

    Raises:
        TargetError: naming the adapter and the convert step.
    """
    meant = base_of(adapter)
    _refuse_offset(adapter, meant)
    if meant.kind == RESIDUAL:
        raise TargetError(
            f"{adapter} applies to decompose's residual, not to the original model that {what} "
            f"uses: run `ailora-tools convert --trained {adapter} -o LORA` and use LORA"
        )


def _refuse_offset(adapter, meant: BaseOf) -> None:
    if meant.offset:
        raise TargetError(
            f"{adapter} was trained on the original weights with the initial product s·B0·A0 "
            "subtracted inside (exact mode), so alone it is not the trained change: run "
            f"`ailora-tools convert --trained {adapter} -o LORA` and use LORA"
        )


def starts_offset(initial: str | os.PathLike) -> bool:
    """Whether training from the initial adapter `initial` (decompose's OUT/adapter) starts exactly at its base:
    s·B0·A0 taken out of the base (the residual) or, on the original, subtracted inside the adapter (exact mode).
    False for a `--no-offset` decomposition, which starts at the original + s·B0·A0 as a plain LoRA would."""
    return not read_manifest(Path(initial).parent / DECOMPOSE_MANIFEST).get(NO_OFFSET, False)


def frozen_factors(initial: str | os.PathLike) -> tuple[str, ...]:
    """The factors ("lora_A", "lora_B") that stay frozen when training from the initial adapter `initial`: as
    decompose's manifest records them, or ("lora_B",) for an adapter PEFT made with `init_lora_weights="mica"`."""
    recorded = read_manifest(Path(initial).parent / DECOMPOSE_MANIFEST).get(FROZEN)
    if recorded is not None:
        return tuple(recorded)
    peft_init = read_manifest(Path(initial) / "adapter_config.json").get("init_lora_weights")
    return ("lora_B",) if peft_init == "mica" else ()


def read_manifest(path: str | os.PathLike) -> dict:
    """A manifest's JSON in the current shape (`upgrade`), or {} when the file is missing or unreadable."""
    try:
        return upgrade(json.loads(Path(path).read_text()), Path(path).name)
    except (OSError, json.JSONDecodeError):
        return {}


def upgrade(manifest: dict, name: str) -> dict:
    """Manifest `name` (DECOMPOSE_MANIFEST, ...) brought to schema `MANIFEST_SCHEMA`. Schema 1 (no `schema` key)
    had no `applies_to` block in decompose's manifest (its per-module samples say the same) nor in convert's (a
    converted LoRA applies to the original)."""
    if manifest.get("schema", 1) >= MANIFEST_SCHEMA or manifest.get("applies_to"):
        return manifest
    if name == CONVERT_MANIFEST:
        manifest = {**manifest, "applies_to": BaseOf(ORIGINAL).block()}
    elif name == DECOMPOSE_MANIFEST:
        kind = manifest.get("adapter_base") or (ORIGINAL if manifest.get("method") == "lora" else RESIDUAL)
        manifest = {
            **manifest,
            "applies_to": decompose_identity(
                manifest.get("modules", {}),
                original=(manifest.get("source") or {}).get("model"),
                residual=RESIDUAL_DIR,
                kind=kind,
            ),
        }
    return {**manifest, "schema": MANIFEST_SCHEMA}


def original_base_of(initial: str | os.PathLike) -> str | None:
    """The original model an initial adapter was decomposed from (its decompose manifest's source)."""
    return (read_manifest(Path(initial).parent / DECOMPOSE_MANIFEST).get("source") or {}).get("model")


def task_record(adapter_dir: str | os.PathLike) -> dict | None:
    """The task record (`training.tasks`) of a trained, converted or BitFit output's manifest, if it has one."""
    for name in (TRAIN_MANIFEST, CONVERT_MANIFEST, BITFIT_MANIFEST):
        if (path := Path(adapter_dir) / name).is_file():
            return json.loads(path.read_text()).get("task")
    return None


def name_or_path(base: str | None) -> str | None:
    """A base as a config records it: a local directory absolute (PEFT resolves relative ones), a Hub id as it is."""
    return str(Path(base).expanduser().absolute()) if base and Path(base).expanduser().is_dir() else base
