"""Fingerprints that recognise a model directory wherever it was moved: BLAKE3 of a tensor's first 64 KiB as stored,
for a few tensors picked to identify it (`manifests`' `applies_to` blocks record them)."""

from __future__ import annotations

from .hashing import bytes_digest

SAMPLE_BYTES = 64 * 1024
#: how many tensors identify a model: the first, the last and evenly spaced ones between
IDENTITY_TENSORS = 4


def sample(data) -> str:
    """The fingerprint of a tensor's stored bytes: BLAKE3 of its first 64 KiB."""
    return bytes_digest(memoryview(data)[:SAMPLE_BYTES]).hex()


def stored_sample(ckpt, name: str) -> str | None:
    """The fingerprint of tensor `name` as `ckpt` (a Checkpoint) stores it; None if it has no such tensor."""
    info = ckpt.tensors.get(name)
    if info is None:
        return None
    header = ckpt.shard(info.file)  # a Hub shard: once it is here
    with open(header.path, "rb") as f:
        f.seek(header.data_start + info.begin)
        return sample(f.read(min(SAMPLE_BYTES, info.nbytes)))


def pick(names) -> list[str]:
    """The few of `names` (sorted) that identify a model: the first, the last and evenly spaced ones between."""
    names = sorted(names)
    if len(names) <= IDENTITY_TENSORS:
        return names
    step = (len(names) - 1) / (IDENTITY_TENSORS - 1)
    return sorted({names[round(i * step)] for i in range(IDENTITY_TENSORS)})


def fingerprints(ckpt, tensors=None) -> dict[str, str]:
    """{tensor: fingerprint} of `tensors` in `ckpt` (default: `pick` among its matrices); absent ones left out."""
    if tensors is None:
        tensors = pick(n for n, t in ckpt.tensors.items() if len(t.shape) == 2)
    found = {t: stored_sample(ckpt, t) for t in tensors}
    return {t: s for t, s in found.items() if s is not None}
