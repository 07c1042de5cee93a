"""A Hugging Face checkpoint, local or on the Hub, as an index of tensors resolved once.

The index maps each tensor to its shard, dtype, shape and byte range. For a Hub id, the non-weight files
come with one `snapshot_download`; each shard's header is read from the cache or, when the shard is not
there yet, with HTTP range requests (its first bytes only), so every header is validated before anything
is written. The shards themselves are downloaded with huggingface_hub (its cache, token and offline mode
apply) on a background thread, one at a time in the order a run asks for them (`fetch`), so that shard k+1
downloads while shard k is processed; `shard` waits for one and checks that the file that arrived has the
header that was validated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import FormatError, InputNotFoundError, OptionError, UnsupportedError
from .documents import read_document
from .tensorio import MAX_HEADER, ShardHeader, TensorInfo, parse_header, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: files never copied next to a rewritten model: weights in other formats would be stale
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx") + PICKLE_SUFFIXES


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it is, its config, its shards and every tensor's location.

    Build it with `Checkpoint.open`. `headers` holds each shard's validated header; a Hub shard's file may
    still have to be downloaded (`fetch`, `ready`, `shard`).
    """

    source: str
    revision: str | None
    root: Path
    config: dict
    shards: list[str]
    headers: dict[str, ShardHeader]
    index_file: str | None
    repo_id: str | None = None
    extra_files: list[str] = field(default_factory=list)
    _download: Callable[[str], Path] | None = field(default=None, repr=False)
    _pending: dict[str, Future | None] = field(default_factory=dict, repr=False)  # Hub shards not here yet
    _downloader: ThreadPoolExecutor | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        model: str | os.PathLike,
        *,
        revision: str | None = None,
        allow_pickle: bool = False,
        scratch: str | os.PathLike | None = None,
    ) -> Checkpoint:
        """Resolve a local directory or a Hub repo id and read every shard header.

        Args:
            model: a directory holding config.json and safetensors weights, or a Hub id "org/name".
            revision: Hub branch, tag or commit (Hub ids only).
            allow_pickle: accept a local model with only .bin/.pt weights: each file is loaded with
                torch.load(weights_only=True), one at a time, and re-saved as safetensors in a scratch
                directory under `scratch` (removed when the Checkpoint is collected or at exit).

        Raises:
            InputNotFoundError: no such directory or repo, or no weights in it.
            FormatError: an index or shard header that is corrupt or points outside the model.
            UnsupportedError: only pickled weights (.bin/.pt) are present.

        Example:
            >>> ckpt = Checkpoint.open("meta-llama/Llama-3.1-8B")  # doctest: +SKIP
        """
        path = Path(model).expanduser()
        if path.is_dir() and revision is not None:
            raise OptionError(
                f"--revision {revision}: applies to Hub ids only, and {model} is a local directory; "
                "check out that revision there, or drop --revision"
            )
        if path.is_dir():
            if allow_pickle and _pickle_only(path):
                staged = Path(tempfile.mkdtemp(prefix=".ailora-unpickled-", dir=scratch))
                ckpt = cls._load(str(model), None, _unpickle(path.resolve(), staged), None, _local(str(model), staged))
                weakref.finalize(ckpt, shutil.rmtree, staged, True)
                return ckpt
            return cls._load(str(model), None, path.resolve(), None, _local(str(model), path))
        if path.exists():
            raise InputNotFoundError(f"{model}: is a file; pass the model directory that holds it")
        if os.path.isabs(str(model)) or str(model).startswith(".") or str(model).count("/") != 1:
            raise InputNotFoundError(f"{model}: no such directory (and not a Hub repo id of the form org/name)")
        return cls._from_hub(str(model), revision)

    @classmethod
    def _from_hub(cls, repo_id: str, revision: str | None) -> Checkpoint:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        ignore = [f"*{s}" for s in WEIGHT_SUFFIXES]
        try:
            root = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore))
        except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
            why = (
                "HF_HUB_OFFLINE is set, so only the local cache was searched; unset it to download"
                if constants.HF_HUB_OFFLINE
                else f"{_root_cause(e)}; check the id, --revision, your token and network"
            )
            raise InputNotFoundError(f"{repo_id}: not found on the Hub or in the local cache ({why})") from e

        commit = root.name  # the snapshot folder is named by the commit: headers and downloads agree

        def header(name: str) -> tuple[ShardHeader, bool]:
            if (root / name).is_file():
                return read_header(root / name, name), False
            try:
                head, size = hub_header(repo_id, commit, name)
            except (HfHubHTTPError, OSError, KeyError, ValueError) as e:
                raise InputNotFoundError(
                    f"{repo_id}: shard {name} is not in the local cache and its header could "
                    f"not be read from the Hub ({_root_cause(e)}); check your connection "
                    "and token" + (", or unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "")
                ) from e
            return parse_header(root / name, head, size, name), True

        def download(name: str) -> Path:
            try:
                return Path(hub_download(repo_id, name, commit))
            except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
                raise InputNotFoundError(f"{repo_id}: shard {name} could not be fetched ({e})") from e

        return cls._load(repo_id, revision, root, repo_id, header, download)

    @classmethod
    def _load(cls, source, revision, root: Path, repo_id, header, download=None) -> Checkpoint:
        config_path = root / "config.json"
        config = read_document(
            config_path,
            json.loads,
            invalid=f"{config_path}: not valid JSON",
            missing=f"{source}: no config.json; pass a Hugging Face model directory",
        )
        files = {p.name for p in root.iterdir() if p.is_file()}
        if INDEX_NAME in files:
            shards, index_file = _shards_from_index(root / INDEX_NAME), INDEX_NAME
        elif SINGLE_NAME in files or repo_id is not None:
            shards, index_file = [SINGLE_NAME], None
        else:
            other = sorted(f for f in files if f.endswith(".safetensors"))
            if not other:
                if any(f.endswith(PICKLE_SUFFIXES) for f in files):
                    raise UnsupportedError(
                        f"{source}: only pickled weights (.bin/.pt) found, and unpickling can run code. Pass "
                        "--allow-pickle to load them with torch.load(weights_only=True), or convert them to "
                        "safetensors first (save_pretrained(..., safe_serialization=True))"
                    )
                raise InputNotFoundError(f"{source}: no *.safetensors weights in {root}")
            shards, index_file = other, None
        headers, pending = {}, {}
        for name in shards:
            headers[name], remote = header(name)
            if remote:
                pending[name] = None
        ckpt = cls(
            source, revision, root, config, shards, headers, index_file, repo_id, _download=download, _pending=pending
        )
        ckpt.extra_files = _extra_files(root, index_file)
        ckpt._check_index(root / INDEX_NAME if index_file else None)
        return ckpt

    def _check_index(self, index_path: Path | None) -> None:
        seen: dict[str, str] = {}
        for shard, header in self.headers.items():
            for name in header.tensors:
                if name in seen:
                    raise FormatError(f"{self.source}: tensor {name!r} is stored twice ({seen[name]} and {shard})")
                seen[name] = shard
        if index_path is not None:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            for name, shard in weight_map.items():
                if seen.get(name) != shard:
                    raise FormatError(
                        f"{index_path}: weight_map puts {name!r} in {shard} but "
                        + (f"it is in {seen[name]}" if name in seen else "no shard holds it")
                    )

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name."""
        return {n: t for h in self.headers.values() for n, t in h.tensors.items()}

    def fetch(self, names: list[str]) -> None:
        """Start downloading the shards among `names` that are not here yet, one at a time in this order, on a
        background thread (Hub checkpoints; nothing to do for local ones)."""
        for name in names:
            if name in self._pending and self._pending[name] is None:
                if self._downloader is None:
                    self._downloader = ThreadPoolExecutor(1, thread_name_prefix="download")
                self._pending[name] = self._downloader.submit(self._download, name)

    def ready(self, name: str) -> bool:
        """Whether the shard's file is here, so that `shard` returns at once."""
        future = self._pending.get(name)
        return name not in self._pending or (future is not None and future.done())

    def shard(self, name: str) -> ShardHeader:
        """The shard's header, once its file is here: waits for its download (starting it if need be).

        Raises:
            InputNotFoundError: the download failed.
            FormatError: the file that arrived does not have the header validated before (changed on the
                Hub, or a corrupt download); nothing of this shard has been written then.
        """
        if name not in self._pending:
            return self.headers[name]
        self.fetch([name])
        path, expected = self._pending[name].result(), self.headers[name]
        got = read_header(path, name)
        if (got.raw, got.size) != (expected.raw, expected.size):
            raise FormatError(
                f"{path}: the downloaded file ({got.size} bytes) does not have the header checked before "
                f"writing ({expected.size} bytes); delete it from the Hugging Face cache and rerun with "
                "--resume (the output is incomplete: it has no manifest)"
            )
        del self._pending[name]
        self.headers[name] = got
        return got

    def stop_fetching(self) -> None:
        """Cancel the downloads not started yet; one under way finishes in the background."""
        for name, future in self._pending.items():
            if future is not None and future.cancel():
                self._pending[name] = None
        if self._downloader is not None:
            self._downloader.shutdown(wait=False)
            self._downloader = None

    def files(self, *, fetch: bool = True) -> dict[str, Path]:
        """Every file a rewrite reads, by its path relative to the model: shards, index and non-weight files.

        Hub shards not here yet are downloaded first; with `fetch=False` they are left out instead.
        """
        if fetch:
            self.fetch(self.shards)
        paths = {s: self.shard(s).path for s in self.shards if fetch or self.ready(s)}
        names = self.extra_files + ([self.index_file] if self.index_file else [])
        return {**paths, **{name: self.root / name for name in names}}

    @property
    def name_or_path(self) -> str:
        """What PEFT's `base_model_name_or_path` should say: the Hub id, or the absolute local directory."""
        return self.repo_id or str(Path(self.source).expanduser().absolute())

    def describe(self) -> dict:
        """Where the checkpoint came from, for manifests (local models by absolute path)."""
        return {"model": self.name_or_path, "revision": self.revision, "path": str(self.root)}


def _local(source: str, root: Path):
    """The header of each shard of a local directory."""

    def header(name: str) -> tuple[ShardHeader, bool]:
        if not (root / name).is_file():
            raise InputNotFoundError(f"{source}: shard {name} named by the index is missing; re-download it")
        return read_header(root / name, name), False

    return header


def hub_header(repo_id: str, revision: str, name: str, *, session=None) -> tuple[bytes, int]:
    """A Hub file's first bytes (length field and JSON header) and its size, by HTTP range requests: one of
    100 kB, and a second one for a longer header (as huggingface_hub's `parse_safetensors_file_metadata`).
    `session`: the HTTP client (default: huggingface_hub's `get_session()`, with its proxies and retries)."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    if constants.is_offline_mode():
        raise OSError("HF_HUB_OFFLINE is set")
    url = hf_hub_url(repo_id, name, revision=revision)

    def get(first: int, last: int):
        try:
            response = (session or get_session()).get(
                url,
                headers={**build_hf_headers(), "range": f"bytes={first}-{last}"},
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            )
        except Exception as e:  # the HTTP client's connection and timeout errors are not OSErrors
            raise OSError(f"{e.__class__.__name__}: {e}") from e
        hf_raise_for_status(response)
        return response

    response = get(0, 100_000 - 1)
    size = int(response.headers["content-range"].rsplit("/", 1)[1])  # "bytes 0-99999/SIZE"
    head = response.content[:100_000]
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 8 + n <= min(size, 8 + MAX_HEADER):
        head += get(len(head), 8 + n - 1).content
    return head[: 8 + n], size


def hub_download(repo_id: str, name: str, revision: str) -> str:
    """Download one file into the huggingface_hub cache; its path in the snapshot folder."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, name, revision=revision)


def _shards_from_index(index_path: Path) -> list[str]:
    try:
        doc = json.loads(index_path.read_text(), object_pairs_hook=_no_duplicates)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{index_path}: not a valid safetensors index ({e})") from e
    shards: list[str] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or len(PurePosixPath(shard).parts) != 1 or shard in ("..", ".") or "\\" in shard:
            raise FormatError(
                f"{index_path}: weight_map sends {tensor!r} to {shard!r}, outside the model directory; "
                "refusing to read it"
            )
        if shard not in shards:
            shards.append(shard)
    return shards


def _no_duplicates(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"it names {k!r} twice")
        seen.add(k)
    return dict(pairs)


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain (a connection error under huggingface_hub's own), in one short line."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:160]}"


def _extra_files(root: Path, index_file: str | None) -> list[str]:
    """Non-weight files to copy beside a rewritten model, subfolders included (sentence-transformers'
    `1_Pooling/`, say), as relative POSIX paths; hidden files and folders are left out."""
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(top).relative_to(root)
        for name in names:
            path = (rel / name).as_posix()
            if not name.startswith(".") and not name.endswith(WEIGHT_SUFFIXES) and path != index_file:
                found.append(path)
    return sorted(found)


def _pickle_only(root: Path) -> bool:
    names = [p.name for p in root.iterdir() if p.is_file()]
    return not any(n.endswith(".safetensors") for n in names) and any(n.endswith(PICKLE_SUFFIXES) for n in names)


def _unpickle(root: Path, staged: Path) -> Path:
    """Re-save every pickled weight file of `root` as safetensors in `staged`, with an index; copy the rest."""
    import torch
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    for src in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)):
        try:
            state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise FormatError(f"{src}: cannot be loaded with torch.load(weights_only=True): {e}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FormatError(f"{src}: not a state dict of tensors")
        name = src.name.replace("pytorch_model", "model").rsplit(".", 1)[0] + ".safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(staged / name))
        weight_map.update({k: name for k in state})
        del state
    (staged / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for p in root.iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"):
            shutil.copyfile(p, staged / p.name)
    return staged
