"""Which base an adapter belongs to, and whether a given model is that base.

decompose subtracts s·B0·A0 from each target, so its adapter (and every adapter trained from it) applies
to OUT/residual, not to the original model; plain LoRA adapters and converted ones apply to the original.
Used on the wrong base, an adapter still loads and gives a model that is off by the initial product: no
error anywhere, only wrong logits. The manifests say which base is meant (`adapter_base`), and each
module's manifest entry holds a fingerprint of the source tensor and of the residual (BLAKE3 of their first
64 KiB), so a model directory is recognised as the original or the residual wherever it was moved.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError
from .io.hashing import bytes_digest

SAMPLE_BYTES = 64 * 1024
#: every output's manifest, written last (a directory without one is not complete); `verify` knows them all
DECOMPOSE_MANIFEST, TRAIN_MANIFEST, CONVERT_MANIFEST = "ailora.json", "ailora-train.json", "ailora-convert.json"
MERGE_MANIFEST, SPECTRUM_MANIFEST, COMPARE_MANIFEST = "ailora-merge.json", "spectrum.json", "compare.json"
#: `train --bitfit`'s output: trained bias terms (and a classification head), no adapter (`training.bitfit`)
BITFIT_MANIFEST = "ailora-bitfit.json"
MANIFESTS = (DECOMPOSE_MANIFEST, MERGE_MANIFEST, CONVERT_MANIFEST, TRAIN_MANIFEST, SPECTRUM_MANIFEST, COMPARE_MANIFEST,
             BITFIT_MANIFEST)
#: a decompose output's two directories; `convert --dora exact` writes DORA_BASE_DIR and ADAPTER_DIR
RESIDUAL_DIR, ADAPTER_DIR, DORA_BASE_DIR = "residual", "adapter", "base"
RESIDUAL, ORIGINAL = "residual", "original"


@dataclass
class BaseOf:
    """The base an adapter applies to: RESIDUAL, ORIGINAL or None (no manifest says), and how to recognise it."""

    kind: str | None
    #: trained with the initial product subtracted inside (train's exact mode): only `convert` gives a LoRA
    offset: bool = False
    method: str | None = None  # decompose's init method
    residual: str | None = None  # where decompose wrote the residual
    original: str | None = None  # the model decompose read
    #: module -> {"tensor", "source_sample", "residual_sample"}
    samples: dict[str, dict] = field(default_factory=dict)


def sample(data) -> str:
    """The fingerprint of a tensor's stored bytes: BLAKE3 of its first 64 KiB."""
    return bytes_digest(memoryview(data)[:SAMPLE_BYTES]).hex()


def base_of(adapter: str | os.PathLike) -> BaseOf:
    """What the manifests beside `adapter` say about its base (decompose's adapter/, a trained or converted one)."""
    d = Path(adapter)
    if (d / CONVERT_MANIFEST).is_file():
        return BaseOf(ORIGINAL)
    if (d / TRAIN_MANIFEST).is_file():
        trained = read_manifest(d / TRAIN_MANIFEST)
        initial = base_of(trained.get("initial_adapter", ""))
        kind = trained.get("adapter_base", initial.kind)
        offset = kind == ORIGINAL and trained.get("mode") == "exact" and initial.method not in (None, "lora")
        return BaseOf(kind, offset, initial.method, initial.residual, initial.original, initial.samples)
    if (d.parent / DECOMPOSE_MANIFEST).is_file():
        m = read_manifest(d.parent / DECOMPOSE_MANIFEST)
        kind = m.get("adapter_base") or (ORIGINAL if m.get("method") == "lora" else RESIDUAL)
        samples = {k: v for k, v in m.get("modules", {}).items() if "source_sample" in v}
        return BaseOf(kind, False, m.get("method"), str(d.parent / RESIDUAL_DIR), (m.get("source") or {}).get("model"),
                      samples)
    return BaseOf(None)


def stored_sample(ckpt, name: str) -> str | None:
    """The fingerprint of tensor `name` as `ckpt` (a Checkpoint) stores it; None if it has no such tensor."""
    info = ckpt.tensors.get(name)
    if info is None:
        return None
    with open(ckpt.headers[info.file].path, "rb") as f:
        f.seek(ckpt.headers[info.file].data_start + info.begin)
        return sample(f.read(min(SAMPLE_BYTES, info.nbytes)))


def recognise(ckpt, samples: dict[str, dict]) -> str | None:
    """RESIDUAL or ORIGINAL when `ckpt` holds that model's first fingerprinted tensor, else None."""
    for stats in samples.values():
        found = stored_sample(ckpt, stats["tensor"])
        return {stats["source_sample"]: ORIGINAL, stats.get("residual_sample"): RESIDUAL}.get(found)
    return None


def check_base(adapter: str | os.PathLike, ckpt, *, flag: str = "--base") -> None:
    """Refuse to apply `adapter` to `ckpt` when the manifests show it belongs to the other base.

    Raises:
        TargetError: naming the adapter, the base given, the base it belongs to, and what to do.
    """
    meant = base_of(adapter)
    _refuse_offset(adapter, meant)
    if meant.kind is None or not meant.samples:
        return
    found = recognise(ckpt, meant.samples)
    if found is None and _decompose_residual(Path(ckpt.root)):  # some other decompose's residual
        found = RESIDUAL
    if meant.kind == RESIDUAL and found == ORIGINAL:
        raise TargetError(
            f"{adapter} applies to the residual {meant.residual} (decompose subtracted the initial product from the "
            f"weights), but {flag} {ckpt.source} is the original model: the result would be off by s·B0·A0. Pass "
            f"{flag} {meant.residual}, or run `ailora-tools convert` first to get a LoRA for the original model")
    if meant.kind == ORIGINAL and found == RESIDUAL:
        raise TargetError(f"{adapter} applies to the original model {meant.original}, but {flag} {ckpt.source} is "
                          f"a residual decompose wrote: pass {flag} {meant.original}")


def require_original(adapter: str | os.PathLike, what: str) -> None:
    """Refuse a residual-relative adapter where only the original base can be meant (serving, llama.cpp).

    Raises:
        TargetError: naming the adapter and the convert step.
    """
    meant = base_of(adapter)
    _refuse_offset(adapter, meant)
    if meant.kind == RESIDUAL:
        raise TargetError(f"{adapter} applies to decompose's residual, not to the original model that {what} "
                          f"uses: run `ailora-tools convert --trained {adapter} -o LORA` and use LORA")


def _decompose_residual(root: Path) -> bool:
    return root.name == RESIDUAL_DIR and read_manifest(root.parent / DECOMPOSE_MANIFEST).get("adapter_base", RESIDUAL) == RESIDUAL


def _refuse_offset(adapter, meant: BaseOf) -> None:
    if meant.offset:
        raise TargetError(f"{adapter} was trained on the original weights with the initial product s·B0·A0 "
                          "subtracted inside (exact mode), so alone it is not the trained change: run "
                          f"`ailora-tools convert --trained {adapter} -o LORA` and use LORA")


def read_manifest(path: str | os.PathLike) -> dict:
    """A manifest's JSON, or {} when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
