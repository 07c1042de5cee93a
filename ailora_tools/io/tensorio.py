"""Safetensors at the byte level: validated headers, tensor reads by byte range, shard copy-and-patch.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
Offsets in the header count from the start of the buffer. A tensor rewritten with the same dtype and
shape occupies the same byte range, so a shard is patched by copying its bytes and overwriting ranges.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, InputNotFoundError, UnsupportedError

# torch is imported inside the functions that need it, so that the CLI can start hashing before it loads.
#: safetensors dtype name -> (torch dtype name, or None when torch cannot compute with it; bytes per element)
DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": (None, 2),
    "U32": (None, 4),
    "U64": (None, 8),
    "F8_E4M3": (None, 1),
    "F8_E5M2": (None, 1),
}
#: dtypes whose matrices can be decomposed, merged or written as residuals
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: the CLI's --dtype / --residual-dtype names -> safetensors dtype names
DTYPE_FLAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 8 * 1024 * 1024
#: what to do about a damaged file, the end of every message that finds one
REDO = "re-download or re-save it (an ailora-tools output: rerun the command that wrote it)"


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype) -> str:
    """The safetensors dtype name of a torch dtype (torch.bfloat16 -> "BF16")."""
    return next(k for k, (t, _) in DTYPES.items() if t is not None and str(dtype) == f"torch.{t}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and byte range in the data buffer."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, validated safetensors header. `data_start` is the file offset of the data buffer."""

    path: Path
    raw: bytes
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int


def read_header(path: Path, name: str | None = None) -> ShardHeader:
    """Read and validate a safetensors header without touching the data.

    Checks the length field, the JSON, every entry's dtype/shape/offsets, that ranges match
    dtype x shape, stay inside the file and do not overlap.

    Raises:
        FormatError: naming the file and what is wrong with it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if 8 + n <= size and n <= MAX_HEADER:
            head += f.read(n)
    return parse_header(path, head, size, name)


def parse_header(path: Path, head: bytes, size: int, name: str | None = None) -> ShardHeader:
    """Validate a safetensors header from the file's first bytes (length field and JSON) and its size.

    `read_header` for a file read elsewhere, such as the first bytes of a Hub file fetched by range requests.

    Raises:
        FormatError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if len(head) < 8:
        raise FormatError(f"{path}: not a safetensors file (only {size} bytes, at least 8 needed); {REDO}")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size or len(head) < 8 + n:
        raise FormatError(
            f"{path}: header length {n} runs past the file ({size} bytes, at least {8 + n} needed): the file is "
            f"truncated or corrupt; {REDO}"
        )
    raw = head[8 : 8 + n]
    return ShardHeader(path, raw, *_parse(path, name or path.name, raw, size - 8 - n), data_start=8 + n, size=size)


def _parse(path: Path, name: str, raw: bytes, buffer_size: int) -> tuple[dict, dict]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(
            f"{path}: header is not valid JSON ({e.__class__.__name__}); the file is corrupt; {REDO}"
        ) from e
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: header is not a JSON object; the file is corrupt; {REDO}")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        tensors[key] = _entry(path, name, key, entry, buffer_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(
                f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer; the file is corrupt; {REDO}"
            )
    return tensors, metadata


def _entry(path: Path, name: str, key: str, entry, buffer_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: entry {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{path}: tensor {key!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPES[dtype][1]:
        raise FormatError(
            f"{path}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs "
            f"{numel * DTYPES[dtype][1]}; the file is corrupt; {REDO}"
        )
    if offsets[1] > buffer_size:
        raise FormatError(
            f"{path}: tensor {key!r} ends at byte {offsets[1]} of a {buffer_size}-byte data buffer: the file is "
            f"truncated ({offsets[1] - buffer_size} bytes missing); {REDO}"
        )
    return TensorInfo(key, name, dtype, tuple(shape), offsets[0], offsets[1])


def read_tensor(header: ShardHeader, name: str, fd: int | None = None):
    """Read one tensor by its byte range (no mmap, no other tensor touched)."""
    import torch

    info = header.tensors[name]
    if DTYPES[info.dtype][0] is None:
        raise UnsupportedError(f"{header.path}: tensor {name!r} has dtype {info.dtype}, which torch cannot read")
    buf = bytearray(info.nbytes)
    own = fd is None
    fd = os.open(header.path, os.O_RDONLY) if own else fd
    try:
        got = os.preadv(fd, [buf], header.data_start + info.begin)
    finally:
        if own:
            os.close(fd)
    if got != info.nbytes:
        raise FormatError(
            f"{header.path}: tensor {name!r} is cut short ({got} of {info.nbytes} bytes): the file "
            f"shrank while it was read; {REDO}"
        )
    if not buf:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def load_tensors(path: Path | str) -> dict:
    """Every tensor of a whole safetensors file (an adapter, trained biases, optimizer state), each read by its
    byte range after the header is validated: a damaged file is named with the tensor and the byte counts.

    Raises:
        InputNotFoundError: no such file. FormatError: a truncated or corrupt file, naming it and what to do.
        UnsupportedError: a dtype torch cannot read.

    Example:
        >>> load_tensors("trained/adapter_model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file")
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {name: read_tensor(header, name, fd) for name in header.tensors}
    finally:
        os.close(fd)


def tensor_bytes(t) -> memoryview:
    """The row-major little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def layout(
    header: ShardHeader,
    replaced: dict[str, str],
    added: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    renamed: dict[str, str] | None = None,
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None = None,
    dropped: set[str] | frozenset[str] = frozenset(),
) -> tuple[bytes, dict[str, int], list[tuple[int, int, int]]]:
    """Plan an output shard whose tensors named in `replaced` get new bytes, of the dtype given there.

    `added` names new tensors (dtype, shape), placed after the existing ones; `renamed` gives existing tensors
    new names in the output header (source name -> output name); `parts` gives replaced tensors that become
    several (a quantised weight and its scales): source name -> {output name: (dtype, shape)}, in their place;
    `dropped` names tensors left out of the output.
    Returns the header bytes to write (8-byte length included; empty when the header is copied: no dtype
    change, nothing added or renamed), each tensor's absolute file offset in the new file (by its source
    name), and the copy operations (src_offset, dst_offset, length), merged into runs, that carry everything
    else over unchanged. The replaced and added ranges are not copied, so they can be written while the copy runs.
    """
    renamed = {n: to for n, to in (renamed or {}).items() if n in header.tensors}
    parts = {n: p for n, p in (parts or {}).items() if n in replaced}
    dropped = {n for n in dropped if n in header.tensors}
    if (
        not added
        and not renamed
        and not parts
        and not dropped
        and all(header.tensors[n].dtype == d for n, d in replaced.items())
    ):
        head, offsets, keep = _same_header(header, replaced)
    else:
        head, offsets, keep = _new_header(header, replaced, added or {}, renamed, parts, dropped)
    return head, offsets, _merged_runs(keep)


def _same_header(header: ShardHeader, replaced: dict[str, str]) -> tuple[bytes, dict[str, int], list]:
    """The layout when the header is copied: every tensor where it was, the bytes between replaced ones copied."""
    offsets = {n: header.data_start + t.begin for n, t in header.tensors.items()}
    keep, at = [], 0
    for t in sorted((header.tensors[n] for n in replaced), key=lambda t: t.begin):
        keep.append((at, at, header.data_start + t.begin - at))
        at = header.data_start + t.end
    keep.append((at, at, header.size - at))
    return b"", offsets, keep


def _new_header(
    header: ShardHeader, replaced: dict[str, str], added: dict, renamed: dict[str, str], parts: dict, dropped: set[str]
) -> tuple[bytes, dict[str, int], list]:
    """The layout under a new header: the tensors in their order (parts in place of their source, added ones last),
    packed; the kept tensors' bytes copied one by one."""
    doc, starts, pos = {}, {}, 0
    if header.metadata:
        doc["__metadata__"] = header.metadata
    ordered = sorted((t for t in header.tensors.values() if t.name not in dropped), key=lambda t: t.begin)
    entries = [
        e
        for t in ordered
        for e in (
            [(n, d, shape, math.prod(shape)) for n, (d, shape) in parts[t.name].items()]
            if t.name in parts
            else [(t.name, replaced.get(t.name, t.dtype), t.shape, t.nbytes // DTYPES[t.dtype][1])]
        )
    ]
    for name, (dtype, shape) in added.items():
        if name in header.tensors:
            raise ValueError(f"{header.path}: tensor {name!r} exists; it cannot be added")
        entries.append((name, dtype, shape, math.prod(shape)))
    for name, dtype, shape, numel in entries:
        out_name, n = renamed.get(name, name), numel * DTYPES[dtype][1]
        if out_name in doc:
            raise ValueError(f"{header.path}: two tensors would be named {out_name!r} in the output")
        doc[out_name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        starts[name] = pos
        pos += n
    js = json.dumps(doc, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    head = struct.pack("<Q", len(js)) + js
    offsets = {name: len(head) + start for name, start in starts.items()}
    keep = [(header.data_start + t.begin, offsets[t.name], t.nbytes) for t in ordered if t.name not in replaced]
    return head, offsets, keep


def _merged_runs(keep: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The copy operations (src, dst, length) with adjacent ones joined and empty ones left out."""
    runs: list[tuple[int, int, int]] = []
    for s, d, n in keep:
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
        elif n:
            runs.append((s, d, n))
    return runs


def copy_ranges(src: Path, dst_fd: int, head: bytes, copies: list[tuple[int, int, int]]) -> None:
    """Write `head` at offset 0, then copy each (src_offset, dst_offset, length) range, kernel-side when possible."""
    if head:
        os.pwrite(dst_fd, head, 0)
    with open(src, "rb") as f:
        sfd = f.fileno()
        for s, d, n in copies:
            while n > 0:
                try:
                    k = os.copy_file_range(sfd, dst_fd, min(n, 1 << 30), s, d)
                except OSError as e:
                    if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back
                        raise
                    k = 0
                if k == 0:
                    chunk = os.pread(sfd, min(n, COPY_CHUNK), s)
                    if not chunk:
                        raise FormatError(f"{src}: file ended early while copying; it is truncated")
                    k = os.pwrite(dst_fd, chunk, d)
                s, d, n = s + k, d + k, n - k
