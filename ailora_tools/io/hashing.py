"""File digests for the manifests, all BLAKE3 (cryptographic, about twice as fast as sha256 here).

- A safetensors file: "blake3-tensors:<hex>", the BLAKE3 of the concatenated BLAKE3 digests of its
  segments (the header, then each tensor's bytes and any gap, in file order) and of the file size. Every
  byte is covered, and the header fixes where the segments lie. A rewritten shard differs from its source
  only in the replaced tensors, so its digest comes from the source's segment digests plus the digests of
  the bytes written: the output is never read back to be hashed, which halves the hashing of a run.
- Any other file (or a safetensors file whose header does not parse): "blake3:<hex>", what `b3sum` prints.

Files are hashed on two background threads through 16 MiB memory-mapped windows: no copy through a read
buffer, a bounded RSS (a whole-file mapping would count the file), and the GIL, which the hashing releases,
is taken once per window, so hashing keeps pace while the main thread imports torch. On machines with many
cores a segment of 32 MiB or more (and a buffer as large) is hashed on `background.IO_THREADS` threads
(BLAKE3's tree hashing: the digest does not depend on it), so hashing stays ahead of parallel copies.
`ailora-tools verify` recomputes either kind.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from ..errors import AiloraError
from . import background
from .background import io_pool
from .tensorio import read_header

PLAIN, TENSORWISE = "blake3", "blake3-tensors"
WINDOW = 16 * 1024 * 1024
#: segments and buffers at least this large are hashed on several threads (where there are cores for it)
PARALLEL_BYTES = 2 * WINDOW
_POOL = io_pool(2, "hash")
_DIGESTS: dict[tuple[str, int, int], Future] = {}


@dataclass(frozen=True)
class Digest:
    """A file's digest as recorded (`value`) and, for safetensors files, its segments' digests."""

    value: str
    segments: tuple[tuple[int, int, bytes], ...] = ()  # (start, end, 32-byte BLAKE3), in file order
    size: int = 0

    def patched(self, replaced: dict[tuple[int, int], bytes]) -> str:
        """The digest of this file with the segments at these (start, end) ranges replaced by bytes whose
        BLAKE3 digests are given (same header, so the same segments)."""
        if not self.segments or not set(replaced) <= {(s, e) for s, e, _ in self.segments}:
            raise ValueError("patched() needs a safetensors digest and ranges that are its segments")
        return _combine([replaced.get((s, e), d) for s, e, d in self.segments], self.size)


def file_digest(path: str | os.PathLike) -> str:
    """The file's digest as recorded in manifests (see the module doc)."""
    return hash_file(path).value


def hash_file(path: str | os.PathLike) -> Digest:
    """Hash a file: tensor-wise if it is a readable safetensors file, else plainly."""
    path = Path(path)
    segments = None
    if path.suffix == ".safetensors":
        try:
            segments = _segments(path)
        except AiloraError:
            pass  # hashed plainly: it cannot match a recorded tensor-wise digest
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if segments is None:
            return Digest(f"{PLAIN}:{_hash_range(f.fileno(), 0, size).hexdigest()}")
        parts = tuple((s, e, _hash_range(f.fileno(), s, e).digest()) for s, e in segments)
    return Digest(_combine([d for _, _, d in parts], size), parts, size)


def digest_async(path: str | os.PathLike) -> Future:
    """`hash_file` on a background thread; a file already hashed (same size and mtime) is not read again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _POOL.submit(hash_file, path)
    return _DIGESTS[key]


def forget_digests() -> None:
    """Drop the digests `digest_async` remembers, so that the next request reads and hashes the files again."""
    _DIGESTS.clear()


def bytes_digest(data) -> bytes:
    """The 32-byte BLAKE3 digest of a buffer (a segment's digest in `Digest.patched`)."""
    return blake3(data, max_threads=_threads(memoryview(data).nbytes)).digest()


def _segments(path: Path) -> list[tuple[int, int]]:
    header = read_header(path)
    out, at = [(0, header.data_start)], header.data_start
    for t in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
        begin, end = header.data_start + t.begin, header.data_start + t.end
        if begin > at:
            out.append((at, begin))  # a gap between tensors: covered too
        out.append((begin, end))
        at = max(at, end)
    if at < header.size:
        out.append((at, header.size))
    return out


def _threads(nbytes: int) -> int:
    return background.IO_THREADS if nbytes >= PARALLEL_BYTES else 1


def _hash_range(fd: int, start: int, end: int) -> blake3:
    h = blake3(max_threads=_threads(end - start))
    while start < end:
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = min(base + WINDOW, end) - base
        with mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ) as window:
            with memoryview(window) as view:
                h.update(view[start - base :])
        start = base + length
    return h


def _combine(digests: list[bytes], size: int) -> str:
    return f"{TENSORWISE}:{blake3(b''.join(digests) + size.to_bytes(8, 'little')).hexdigest()}"
