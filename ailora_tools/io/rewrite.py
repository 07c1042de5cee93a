"""Rewrite a checkpoint into an output directory: copy every byte, replace only chosen tensors.

Shard by shard: the shard's bytes, less the chosen tensors' ranges, are copied kernel-side by worker
threads, one shard each (`background.IO_THREADS` workers: one on small machines, several on large ones,
which copy that many shards at once; not pieces of one shard, whose writes the filesystem serializes: ext4
and XFS hold the file's inode lock for each buffered write). The next shards' copies overlap this shard's
compute; each chosen tensor's range is written with what `compute` returns while that copy runs; then the
shard is published by rename and recorded in the journal. Source files are hashed on background threads
(`hashing`); an output shard's digest comes from its source's tensor-wise digest and the digests of the
bytes written into it, so it is never read back.
New tensors (a classification head merged into a base without one) are appended to the last shard, whose
header is then rewritten, and entered in the index; renamed tensors (a bare base that gets a head takes the
base model prefix) get new headers and index entries. Non-weight files (config, tokenizer) are copied, or
written with the contents given for them (`files`: a head's labels, a new dtype); the index last. A Hub
checkpoint's shards download in the order they are needed (`Checkpoint.fetch`), and a shard's copy starts
once it is here, so the next shard downloads while this one is processed; one that arrives with another
header than the one validated stops the run before anything of it is written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .background import IO_THREADS, io_pool
from .checkpoint import Checkpoint
from .hashing import bytes_digest, digest_async
from .output import OutputDir
from .tensorio import (
    ShardHeader,
    TensorInfo,
    copy_ranges,
    dtype_name,
    layout,
    load_tensors,
    read_header,
    read_tensor,
    tensor_bytes,
)

if TYPE_CHECKING:
    import torch

#: shards whose copy may be under way at once (each holds an open file)
COPY_AHEAD = max(4, IO_THREADS)
#: replaced tensors whose bytes may wait to be hashed while the next is computed (each holds its buffer)
HASH_AHEAD = 1


@dataclass
class Replaced:
    """What `compute` gives for one tensor: what to store instead (same shape; the output dtype), tensors to keep
    (saved with the shard, so `--resume` gets them back) and a JSON-able record."""

    tensor: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    #: the tensors written beside it, by output name, as `rewrite_checkpoint`'s `parts` planned them
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


#: compute(info, W) -> Replaced
Compute = Callable[[TensorInfo, "torch.Tensor"], Replaced]


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


def by_shard(tensors: Mapping[str, TensorInfo], names: Iterable[str]) -> dict[str, list[str]]:
    """`names` grouped by the shard that holds them, each group in file order (by byte offset): the `plan` of
    `rewrite_checkpoint`."""
    plan: dict[str, list[str]] = {}
    for name in names:
        plan.setdefault(tensors[name].file, []).append(name)
    for group in plan.values():
        group.sort(key=lambda n: tensors[n].begin)
    return plan


@dataclass(frozen=True)
class _Rewrite:
    """What every step of one `rewrite_checkpoint` call shares (its arguments, defaults filled in)."""

    ckpt: Checkpoint
    od: OutputDir
    subdir: str
    plan: dict[str, list[str]]
    compute: Compute
    hashes: Hashes
    out_dtype: str | None
    added: dict[str, torch.Tensor]
    renamed: dict[str, str]
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    dropped: set[str] | frozenset[str]

    def rel(self, name: str) -> str:
        return _rel(self.subdir, name)


def rewrite_checkpoint(
    ckpt: Checkpoint,
    od: OutputDir,
    subdir: str,
    plan: dict[str, list[str]],
    compute: Compute,
    *,
    hashes: Hashes,
    out_dtype: str | None = None,
    added: dict[str, torch.Tensor] | None = None,
    renamed: dict[str, str] | None = None,
    files: dict[str, bytes] | None = None,
    progress: bool = True,
    desc: str = "",
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None = None,
    dropped: set[str] | frozenset[str] = frozenset(),
) -> dict[str, tuple[dict, dict]]:
    """Write `od/subdir` as a copy of the checkpoint whose tensors in `plan` are replaced.

    Args:
        plan: shard name -> tensor names to replace (in that shard; `by_shard` makes it).
        compute: gives each replacement; called in shard order, one tensor at a time.
        out_dtype: safetensors dtype ("F32", "BF16", ...) of replaced tensors; default as stored.
        added: new tensors (name -> tensor, stored as given), appended to the last shard and entered in the index.
        renamed: source name -> name in the output, for tensors whose name changes (`plan`, `compute` and the
            result use source names).
        files: new contents for non-weight files of the checkpoint (relative POSIX path, e.g. "config.json"),
            written instead of a copy.
        parts: replaced tensors stored as several (a quantised weight and its scales): source name -> {output
            name: (dtype, shape)}, the source name first (what `Replaced.tensor` holds), the others from
            `Replaced.parts`; all of them in the source tensor's shard and in the index. Shapes are planned here,
            before anything is computed, so that each shard's header is written first.
        dropped: tensors left out of the output (and its index): the scales of a quantised weight stored otherwise.

    Returns:
        Tensor name -> (extras, record) of every replaced tensor, computed now or by an earlier run (`--resume`).
    """
    run = _Rewrite(ckpt, od, subdir, plan, compute, hashes, out_dtype, added or {}, renamed or {}, parts or {}, dropped)
    files = files or {}
    for name in ckpt.extra_files:
        if name in files:
            _write_small(od, hashes, ckpt.root / name, name, run.rel(name), files[name])
        else:
            _copy_small(od, hashes, ckpt.root / name, name, run.rel(name))
    results: dict[str, tuple[dict, dict]] = {}
    todo, reused = [], []
    for shard in ckpt.shards:
        if _reusable(od, subdir, shard):
            _reuse(od, run.rel(shard), results)
            reused.append(shard)
            hashes.add("output", run.rel(shard), od.path / subdir / shard)
        else:
            todo.append(shard)
    ckpt.fetch(todo + reused)  # Hub shards: downloaded one at a time, in this order, while earlier ones are processed
    _rewrite_shards(run, todo, reused, results, progress, desc)
    last = ckpt.shards[-1]
    split = {p: ckpt.tensors[n].file for n, ps in run.parts.items() for p in ps if p != n}
    _write_index(
        ckpt,
        od,
        hashes,
        subdir,
        changed=out_dtype is not None or bool(run.added) or bool(run.renamed) or bool(run.parts) or bool(dropped),
        added={n: last for n in run.added} | split,
        renamed=run.renamed,
        dropped=dropped,
    )
    return results


def _rewrite_shards(
    run: _Rewrite, todo: list[str], reused: list[str], results: dict, progress: bool, desc: str
) -> None:
    """Rewrite the shards `todo` in order, each one's copy started a few shards ahead (`COPY_AHEAD`)."""
    ckpt = run.ckpt
    copier, hasher = io_pool(IO_THREADS, "copy"), io_pool(1, "hash-out")  # hasher: digests of the bytes written
    hashing: deque[Future] = deque()
    jobs: dict[str, _Job] = {}
    bar = tqdm(total=sum(len(run.plan.get(s, [])) for s in todo), unit="matrix", disable=not progress)
    try:
        for i, shard in enumerate(todo):
            for s in todo[i : i + COPY_AHEAD]:  # the copies of the next shards overlap this one's compute
                if s not in jobs and (s == shard or ckpt.ready(s)):  # a Hub shard waits only when it is this one
                    jobs[s] = _start(run, s, copier)
            bar.set_description(f"{desc} {shard}".strip(), refresh=False)
            job = jobs[shard]
            source = run.hashes.add("source", shard, job.header.path)
            _fill(run, job, shard, results, hasher, hashing, bar)
            job.copied.result()
            os.close(jobs.pop(shard).fd)
            _finish(run, job, shard, source, results)
        for shard in reused:
            run.hashes.add("source", shard, ckpt.shard(shard).path)
    finally:
        ckpt.stop_fetching()
        bar.close()
        for job in jobs.values():
            job.copied.cancel()
        copier.shutdown(wait=True)
        hasher.shutdown(wait=True)
        for job in jobs.values():
            os.close(job.fd)


def _fill(run: _Rewrite, job: _Job, shard: str, results: dict, hasher, hashing: deque[Future], bar) -> None:
    """Compute the shard's replaced tensors and write each into its range (and the added tensors into the last
    shard) while the rest of the shard is copied."""
    where = run.od.partial(run.rel(shard))
    with open(job.header.path, "rb") as src:
        for name in run.plan.get(shard, []):
            new = run.compute(job.header.tensors[name], read_tensor(job.header, name, src.fileno()))
            results[name] = (new.extras, new.record)
            if name in run.parts:  # a tensor stored as several, each checked against its planned place
                given = {name: new.tensor, **new.parts}
                if set(given) != set(run.parts[name]):
                    raise ValueError(f"{name!r}: computed parts {sorted(given)}, planned {sorted(run.parts[name])}")
                for part, t in given.items():
                    _write_part(job, part, t, run.parts[name][part], where)
                bar.update(1)
                continue
            data = tensor_bytes(new.tensor)  # its range is not part of the copy, so it is written at once
            _write_at(job, name, data, where)
            if job.same_layout:  # the output's digest is the source's with this segment's replaced
                hashing.append(hasher.submit(bytes_digest, data))
                job.written[(job.offsets[name], job.offsets[name] + len(data))] = hashing[-1]
                if len(hashing) > HASH_AHEAD:
                    hashing.popleft().result()
            bar.update(1)
    for name, t in (run.added if shard == run.ckpt.shards[-1] else {}).items():
        _write_at(job, name, tensor_bytes(t), where)


def _finish(run: _Rewrite, job: _Job, shard: str, source: Future, results: dict) -> None:
    """Publish a written shard, hash it (from its source's digest when the layout is the same) and journal it."""
    final = run.od.publish(run.rel(shard))
    if job.same_layout:
        run.hashes.add_patched(run.rel(shard), source, job.written)
    else:
        run.hashes.add("output", run.rel(shard), final)
    run.od.mark_done(run.rel(shard), _keep(run.od, run.rel(shard), run.plan.get(shard, []), results))


def _write_at(job: _Job, name: str, data, where: Path) -> None:
    if os.pwrite(job.fd, data, job.offsets[name]) != len(data):
        raise OSError(f"short write of {name!r} into {where}")


def _write_part(job: _Job, name: str, t: torch.Tensor, planned: tuple[str, tuple[int, ...]], where: Path) -> None:
    """Write one planned part of a replaced tensor at its offset, refusing any other dtype or shape."""
    if (dtype_name(t.dtype), tuple(t.shape)) != (planned[0], tuple(planned[1])):
        raise ValueError(
            f"{name!r} is {dtype_name(t.dtype)}{list(t.shape)}, but {planned[0]}{list(planned[1])} was "
            f"planned for it in {where}"
        )
    _write_at(job, name, tensor_bytes(t), where)


def pending(ckpt: Checkpoint, od: OutputDir, subdir: str, plan: dict[str, list[str]]) -> list[str]:
    """The tensors of `plan` that `rewrite_checkpoint` will compute, in the order it will: those of the shards an
    earlier run (`--resume`) has not finished."""
    return [n for s in ckpt.shards if not _reusable(od, subdir, s) for n in plan.get(s, [])]


def _reusable(od: OutputDir, subdir: str, shard: str) -> bool:
    """Whether an earlier run finished this shard: journaled, published, and its extras (if any) saved."""
    rec = od.finished(_rel(subdir, shard))
    return (
        rec is not None
        and (od.path / subdir / shard).is_file()
        and (not rec.get("extras") or (od.path / od.WORK / f"{_rel(subdir, shard)}.extras").is_file())
    )


def _keep(od: OutputDir, piece: str, names: list[str], results: dict) -> dict:
    """The journal record of a finished shard; its replaced tensors' extras go to a file in the work directory."""
    extras = {f"{n}::{k}": v.contiguous() for n in names for k, v in results[n][0].items()}
    if extras:
        from safetensors.torch import save_file

        rel = f"{od.WORK}/{piece}.extras"
        save_file(extras, str(od.partial(rel)))
        od.publish(rel)
    return {"records": {n: results[n][1] for n in names}, "extras": bool(extras)}


def _reuse(od: OutputDir, piece: str, results: dict) -> None:
    """Take the records and extras of a shard an earlier run finished (`_reusable`)."""
    rec = od.finished(piece)
    extras: dict[str, dict] = {n: {} for n in rec.get("records", {})}
    if rec.get("extras"):
        for key, value in load_tensors(od.path / od.WORK / f"{piece}.extras").items():
            name, k = key.split("::", 1)
            extras[name][k] = value
    results.update({n: (extras[n], r) for n, r in rec.get("records", {}).items()})


def _rel(subdir: str, name: str) -> str:
    return f"{subdir}/{name}" if subdir else name


def _start(run: _Rewrite, shard: str, copier) -> _Job:
    """Open the shard's output, lay it out and start copying its unchanged bytes on `copier`."""
    header, names = run.ckpt.shard(shard), run.plan.get(shard, [])
    added = run.added if shard == run.ckpt.shards[-1] else {}
    head, offsets, copies = layout(
        header,
        {n: run.out_dtype or header.tensors[n].dtype for n in names},
        {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in added.items()},
        run.renamed,
        {n: run.parts[n] for n in names if n in run.parts},
        run.dropped,
    )
    fd = os.open(run.od.partial(run.rel(shard)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    return _Job(header, fd, offsets, copier.submit(copy_ranges, header.path, fd, head, copies), not head, {})


def _copy_small(od: OutputDir, hashes: Hashes, src: Path, name: str, rel: str) -> None:
    shutil.copyfile(src, od.partial(rel))
    hashes.add("source", name, src)
    hashes.add("output", rel, od.publish(rel))


def _write_small(od: OutputDir, hashes: Hashes, src: Path, name: str, rel: str, data: bytes) -> None:
    """Write `rel` with new contents instead of a copy of `src` (still hashed as this run's source)."""
    with od.open_atomic(rel) as f:
        f.write(data)
    hashes.add("source", name, src)
    hashes.add("output", rel, od.path / rel)


def _write_index(
    ckpt: Checkpoint,
    od: OutputDir,
    hashes: Hashes,
    subdir: str,
    changed: bool,
    added: dict[str, str],
    renamed: dict[str, str],
    dropped=frozenset(),
) -> None:
    if ckpt.index_file is None:
        return
    rel, src = _rel(subdir, ckpt.index_file), ckpt.root / ckpt.index_file
    if not changed:
        return _copy_small(od, hashes, src, ckpt.index_file, rel)
    doc = json.loads(src.read_text())
    doc["weight_map"] = {renamed.get(k, k): v for k, v in doc["weight_map"].items() if k not in dropped} | added
    doc.setdefault("metadata", {})["total_size"] = sum(
        (od.path / subdir / s).stat().st_size - read_header(od.path / subdir / s).data_start for s in ckpt.shards
    )
    with od.open_atomic(rel, "w") as f:
        json.dump(doc, f, indent=2)
    hashes.add("source", ckpt.index_file, src)
    hashes.add("output", rel, od.path / rel)
