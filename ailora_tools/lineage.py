"""What a run started from, as its manifest records it: the digests of its inputs (the initial adapter's weights,
the data files) that `--resume` and `convert` compare, and the initial adapter a trained one came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputNotFoundError, OptionError
from .io.fingerprints import fingerprints
from .io.hashing import bytes_digest, file_digest
from .manifests import ORIGINAL, TRAIN_MANIFEST, BaseOf, trained_identity


def adapter_digest(adapter: str | os.PathLike) -> str | None:
    """The digest of an adapter directory's weights file (None without one): an adapter recognised when copied."""
    weights = Path(adapter) / "adapter_model.safetensors"
    return file_digest(weights) if weights.is_file() else None


def input_digest(path: str | os.PathLike) -> str:
    """The digest of a data input: a file's (`file_digest`), or for a directory (a saved dataset) BLAKE3 of its
    files' relative paths and digests."""
    p = Path(path)
    if not p.is_dir():
        return file_digest(p)
    parts = "".join(f"{f.relative_to(p)}\0{file_digest(f)}\n" for f in sorted(p.rglob("*")) if f.is_file())
    return "blake3-dir:" + bytes_digest(parts.encode()).hex()


def train_identity(adapter, ckpt, kind: str, data, eval_data=None, warning: str | None = None) -> dict:
    """What ailora-train.json records of a run's identity: `applies_to` (`trained_identity`), `inputs` (the
    digests of the initial adapter's weights and of the data files, which `--resume` and `convert` compare), and
    the warning of a forced base."""
    inputs = {
        **({"--adapter": adapter_digest(adapter)} if adapter is not None else {}),
        "--data": input_digest(data),
        **({"--eval-data": input_digest(eval_data)} if eval_data is not None else {}),
    }
    if adapter is None:  # BitFit: the trained biases belong to the model they were trained in
        identity = BaseOf(ORIGINAL, original=ckpt.name_or_path, samples={ORIGINAL: fingerprints(ckpt)}).block()
    else:
        identity = trained_identity(adapter, ckpt, kind, forced=warning is not None)
    return {"applies_to": identity, "inputs": inputs, **({"warnings": [f"--force: {warning}"]} if warning else {})}


def initial_adapter_of(trained: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """The initial adapter a trained adapter started from, as its training manifest records; `given` (--initial)
    only where no manifest names one, or where it holds the same weights (a copy).

    Raises:
        InputNotFoundError: no manifest and no `given`. OptionError: `given` is another adapter than the recorded
        one, or the recorded one changed since training.
    """
    manifest = Path(trained) / TRAIN_MANIFEST
    if not manifest.is_file() and given is None:
        raise InputNotFoundError(f"{trained}: no {TRAIN_MANIFEST} naming the initial adapter; pass --initial")
    if not manifest.is_file():
        return Path(given)
    m = json.loads(manifest.read_text())
    recorded, digest = Path(m["initial_adapter"]), (m.get("inputs") or {}).get("--adapter")
    if given is None or Path(given).resolve() == recorded.resolve():
        if digest and recorded.is_dir() and adapter_digest(recorded) != digest:
            raise OptionError(
                f"{trained}: the initial adapter {recorded} its {TRAIN_MANIFEST} names changed since "
                "training (its weights differ from the recorded digest); pass --initial with the adapter "
                "training started from"
            )
        return recorded
    if digest is not None and adapter_digest(given) == digest:
        return Path(given)  # the recorded adapter, copied or moved
    raise OptionError(
        f"--initial {given}: {trained} was trained from {recorded} ({TRAIN_MANIFEST})"
        + (", whose weights differ from these" if digest else "")
        + "; drop --initial to use the recorded one, or pass a copy of it"
    )
