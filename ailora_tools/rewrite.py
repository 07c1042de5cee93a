"""Rewrite a checkpoint into an output directory: copy every byte, replace only chosen tensors.

Shard by shard: the shard's bytes, less the chosen tensors' ranges, are copied kernel-side on a worker
thread (the next shards' copies overlap this shard's compute); each chosen tensor's range is written with
what `compute` returns while that copy runs; then the shard is published by rename and recorded in the
journal. Source files are hashed on background threads (`hashing`); an output shard's digest comes from its
source's tensor-wise digest and the digests of the bytes written into it, so it is never read back.
New tensors (a classification head merged into a base without one) are appended to the last shard, whose
header is then rewritten, and entered in the index. Non-weight files (config, tokenizer) are copied, or
written with the contents given for them; the index last.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm.auto import tqdm

from .background import io_pool
from .checkpoint import Checkpoint
from .hashing import bytes_digest, digest_async
from .output import OutputDir
from .tensorio import (ShardHeader, TensorInfo, copy_ranges, dtype_name, layout, read_header, read_tensor,
                       tensor_bytes)

if TYPE_CHECKING:
    import torch

#: shards whose copy may be under way at once (one copy thread; each holds an open file)
COPY_AHEAD = 4
#: replaced tensors whose bytes may wait to be hashed while the next is computed (each holds its buffer)
HASH_AHEAD = 1
#: compute(info, W) -> the tensor to store instead of W (same shape; dtype = the output dtype)
Compute = Callable[[TensorInfo, "torch.Tensor"], "torch.Tensor"]


@dataclass
class _Job:
    header: ShardHeader
    fd: int
    offsets: dict[str, int]
    copied: Future
    same_layout: bool  # no dtype change: the output's segments are the source's
    written: dict[tuple[int, int], Future]  # (start, end) in the output -> BLAKE3 of the bytes written there


class Hashes:
    """Digests of a run's source and output files, computed in the background (`hashing`)."""

    def __init__(self):
        self._jobs: dict[tuple[str, str], Callable[[], str]] = {}

    def add(self, kind: str, rel: str, path: Path) -> Future:
        fut = digest_async(path)
        self._jobs[(kind, rel)] = lambda: fut.result().value
        return fut

    def add_patched(self, rel: str, source: Future, written: dict[tuple[int, int], Future]) -> None:
        """An output that is its source with the `written` ranges replaced (same layout)."""
        self._jobs[("output", rel)] = lambda: source.result().patched({k: f.result() for k, f in written.items()})

    def result(self) -> dict[str, dict[str, str]]:
        files: dict[str, dict[str, str]] = {"source": {}, "output": {}}
        for (kind, rel), digest in sorted(self._jobs.items()):
            files[kind][rel] = digest()
        return files


def rewrite_checkpoint(
    ckpt: Checkpoint, od: OutputDir, subdir: str, plan: dict[str, list[str]], compute: Compute, *,
    hashes: Hashes, out_dtype: str | None = None, added: dict[str, "torch.Tensor"] | None = None,
    files: dict[str, bytes] | None = None, on_shard: Callable[[str], dict] = lambda s: {},
    on_reuse: Callable[[str, dict], bool] = lambda s, rec: True, progress: bool = True, desc: str = "",
) -> None:
    """Write `od/subdir` as a copy of the checkpoint whose tensors in `plan` are replaced.

    Args:
        plan: shard name -> tensor names to replace (in that shard).
        compute: gives each replacement; called in shard order, one tensor at a time.
        out_dtype: safetensors dtype ("F32", "BF16", ...) of replaced tensors; default as stored.
        added: new tensors (name -> tensor, stored as given), appended to the last shard.
        files: new contents for non-weight files of the checkpoint (e.g. "config.json"), written instead of a copy.
        on_shard: called after a shard is published; its dict is journaled for `--resume`.
        on_reuse: called for a shard finished by an earlier run; return False to redo it.
    """
    added, files = added or {}, files or {}
    for name in ckpt.extra_files:
        if name in files:
            with od.open_atomic(_rel(subdir, name)) as f:
                f.write(files[name])
            hashes.add("source", name, ckpt.root / name)
            hashes.add("output", _rel(subdir, name), od.path / _rel(subdir, name))
        else:
            _copy_small(od, hashes, ckpt.root / name, _rel(subdir, name))
    last = ckpt.shards[-1]
    todo = []
    for shard in ckpt.shards:
        rec, final = od.finished(_rel(subdir, shard)), od.path / subdir / shard
        if rec is not None and final.is_file() and on_reuse(shard, rec):
            hashes.add("source", shard, ckpt.headers[shard].path)
            hashes.add("output", _rel(subdir, shard), final)
        else:
            todo.append(shard)
    copier, hasher = io_pool(1, "copy"), io_pool(1, "hash-out")  # hasher: digests of the bytes written
    hashing: deque[Future] = deque()
    jobs: dict[str, _Job] = {}
    bar = tqdm(total=sum(len(plan.get(s, [])) for s in todo), unit="matrix", disable=not progress)
    try:
        for i, shard in enumerate(todo):
            for s in todo[i:i + COPY_AHEAD]:  # the copies of the next shards overlap this one's compute
                if s not in jobs:
                    jobs[s] = _start(ckpt.headers[s], od.partial(_rel(subdir, s)), plan.get(s, []), out_dtype, copier,
                                     added if s == last else {})
            bar.set_description(f"{desc} {shard}".strip())
            job = jobs[shard]
            source = hashes.add("source", shard, job.header.path)
            with open(job.header.path, "rb") as src:
                for name in plan.get(shard, []):
                    new = compute(job.header.tensors[name], read_tensor(job.header, name, src.fileno()))
                    data = tensor_bytes(new)  # its range is not part of the copy, so it is written at once
                    if os.pwrite(job.fd, data, job.offsets[name]) != len(data):
                        raise OSError(f"short write of {name!r} into {od.partial(_rel(subdir, shard))}")
                    if job.same_layout:  # the output's digest is the source's with this segment's replaced
                        hashing.append(hasher.submit(bytes_digest, data))
                        job.written[(job.offsets[name], job.offsets[name] + len(data))] = hashing[-1]
                        if len(hashing) > HASH_AHEAD:
                            hashing.popleft().result()
                    bar.update(1)
            for name, t in (added if shard == last else {}).items():
                data = tensor_bytes(t)
                if os.pwrite(job.fd, data, job.offsets[name]) != len(data):
                    raise OSError(f"short write of {name!r} into {od.partial(_rel(subdir, shard))}")
            job.copied.result()
            os.close(jobs.pop(shard).fd)
            final = od.publish(_rel(subdir, shard))
            if job.same_layout:
                hashes.add_patched(_rel(subdir, shard), source, job.written)
            else:
                hashes.add("output", _rel(subdir, shard), final)
            od.mark_done(_rel(subdir, shard), on_shard(shard))
    finally:
        bar.close()
        for job in jobs.values():
            job.copied.cancel()
        copier.shutdown(wait=True)
        hasher.shutdown(wait=True)
        for job in jobs.values():
            os.close(job.fd)
    _write_index(ckpt, od, hashes, subdir, changed=out_dtype is not None or bool(added), added={n: last for n in added})


def _rel(subdir: str, name: str) -> str:
    return f"{subdir}/{name}" if subdir else name


def _start(header: ShardHeader, tmp: Path, names: list[str], out_dtype: str | None, copier,
           added: dict[str, "torch.Tensor"]) -> _Job:
    head, offsets, copies = layout(header, {n: out_dtype or header.tensors[n].dtype for n in names},
                                   {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in added.items()})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    return _Job(header, fd, offsets, copier.submit(copy_ranges, header.path, fd, head, copies), not head, {})


def _copy_small(od: OutputDir, hashes: Hashes, src: Path, rel: str) -> None:
    shutil.copyfile(src, od.partial(rel))
    hashes.add("source", src.name, src)
    hashes.add("output", rel, od.publish(rel))


def _write_index(ckpt: Checkpoint, od: OutputDir, hashes: Hashes, subdir: str, changed: bool,
                 added: dict[str, str]) -> None:
    if ckpt.index_file is None:
        return
    rel, src = _rel(subdir, ckpt.index_file), ckpt.root / ckpt.index_file
    if not changed:
        return _copy_small(od, hashes, src, rel)
    doc = json.loads(src.read_text())
    doc["weight_map"].update(added)
    doc.setdefault("metadata", {})["total_size"] = sum(
        (od.path / subdir / s).stat().st_size - read_header(od.path / subdir / s).data_start for s in ckpt.shards)
    with od.open_atomic(rel, "w") as f:
        json.dump(doc, f, indent=2)
    hashes.add("source", ckpt.index_file, src)
    hashes.add("output", rel, od.path / rel)
