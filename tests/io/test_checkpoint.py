"""Hub checkpoints streamed: headers validated first, each shard downloaded while the one before is processed.

No network: the Hub is a local directory. `hub_header` (the range requests) reads its files' first bytes,
`hub_download` copies a file into the real huggingface_hub cache layout (blobs/ + a snapshot symlink) after
a delay, and snapshot_download itself runs (offline) on that cache.
"""

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest

from ailora_tools import decompose
from ailora_tools.errors import FormatError, InputNotFoundError
from ailora_tools.io import checkpoint, rewrite
from ailora_tools.io.checkpoint import Checkpoint

REPO, COMMIT = "acme/streamed", "89abcdef0123456789abcdef0123456789abcdef"
REAL_HUB_HEADER = checkpoint.hub_header


def _cache_file(cache: Path, src: Path, name: str) -> Path:
    """Put one file where huggingface_hub puts it: blobs/<sha256> and snapshots/<commit>/<name> -> the blob."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, blob)
    link = repo / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo / "snapshots" / f".tmp-{threading.get_ident()}" / name  # same depth: same relative target
    tmp.parent.mkdir(exist_ok=True)
    tmp.symlink_to(os.path.relpath(blob, link.parent))
    os.replace(tmp, link)  # a download that is already cached is replaced, as a new one would be
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return link


def _shard_order(model: Path) -> list[str]:
    return list(dict.fromkeys(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()))


@pytest.fixture
def hub(tiny, tmp_path, monkeypatch):
    """A Hub whose non-weight files are cached and whose shards arrive one at a time, with a delay."""
    remote, cache = Path(tiny("llama")), tmp_path / "hub"
    for p in remote.iterdir():
        if not p.name.endswith(".safetensors"):
            _cache_file(cache, p, p.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    state = {"remote": remote, "cache": cache, "arrived": [], "headers": [], "gate": {}, "corrupt": {}}

    def header(repo_id, revision, name):
        assert (repo_id, revision) == (REPO, COMMIT)
        state["headers"].append(name)
        data = (remote / name).read_bytes()
        return data[: 8 + int.from_bytes(data[:8], "little")], len(data)

    def download(repo_id, name, revision):
        assert (repo_id, revision) == (REPO, COMMIT)
        if name in state["gate"]:  # wait for an event of the run (not a time): False when it never came
            state["gate"][name] = state["gate"][name].wait(timeout=30)
        time.sleep(0.05)  # a delayed source
        src = remote / name
        if name in state["corrupt"]:  # what arrives is not what the header promised
            bad = cache / "corrupt"
            bad.write_bytes(state["corrupt"][name](src.read_bytes()))
            src = bad
        link = _cache_file(cache, src, name)
        state["arrived"].append(name)
        return str(link)

    monkeypatch.setattr(checkpoint, "hub_header", header)
    monkeypatch.setattr(checkpoint, "hub_download", download)
    return state


def test_hub_shards_download_while_earlier_ones_are_processed(hub, tmp_path, monkeypatch):
    order = _shard_order(hub["remote"])
    assert len(order) >= 3
    first_written = threading.Event()
    hub["gate"][order[2]] = first_written  # shard 3 arrives only once shard 1's output is being written
    real_copy = rewrite.copy_ranges

    def copy(path, *args):  # a shard's copy into the output starts
        if Path(path).name == order[0]:
            assert order[2] not in hub["arrived"]  # written as soon as it is here, not once every shard is
            first_written.set()
        return real_copy(path, *args)

    monkeypatch.setattr(rewrite, "copy_ranges", copy)
    summary = decompose(REPO, tmp_path / "out", rank=4, progress=False)
    assert hub["gate"][order[2]] is True  # overlap: shard 1 was written before shard 3 had arrived
    assert hub["headers"] == order and hub["arrived"] == order  # every header first; each shard once, in order
    assert summary["source"]["model"] == REPO
    monkeypatch.setattr(rewrite, "copy_ranges", real_copy)
    local = decompose(hub["remote"], tmp_path / "local", rank=4, progress=False)
    assert local["worst_recon_rel_fro"] == summary["worst_recon_rel_fro"]
    streamed, reference = (json.loads((tmp_path / d / "ailora.json").read_text())["files"] for d in ("out", "local"))
    assert streamed["source"] == reference["source"]
    for rel in reference["output"]:
        if rel != "adapter/adapter_config.json":  # that one names its base, the output directory
            assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes()


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda data: data.replace(b'"format":"pt"', b'"format":"PT"'),
            r"the downloaded file .* does not have the header checked before writing .* rerun with --resume",
        ),
        (lambda data: data[:-100], r"the file is truncated"),
    ],
)
def test_a_shard_that_arrives_with_another_header_stops_the_run_before_it_is_written(hub, tmp_path, change, message):
    order = _shard_order(hub["remote"])
    assert change((hub["remote"] / order[2]).read_bytes()) != (hub["remote"] / order[2]).read_bytes()
    hub["corrupt"][order[2]] = change
    with pytest.raises(FormatError, match=rf"{order[2]}: .*{message}"):
        decompose(REPO, tmp_path / "out", rank=4, progress=False)
    out = tmp_path / "out"
    assert not (out / "ailora.json").exists() and not (out / "residual" / "model.safetensors.index.json").exists()
    assert (out / "residual" / order[0]).is_file() and (out / "residual" / order[1]).is_file()
    assert not (out / "residual" / order[2]).exists() and not list(out.rglob(f".{order[2]}.partial"))
    assert hub["arrived"][:3] == order[:3] and len(hub["arrived"]) < len(order)  # the later downloads were cancelled
    (hub["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / order[2]).unlink()  # as told
    del hub["corrupt"][order[2]]
    decompose(REPO, out, rank=4, progress=False, resume=True)
    decompose(hub["remote"], tmp_path / "local", rank=4, progress=False)
    for shard in order:
        assert (out / "residual" / shard).read_bytes() == (tmp_path / "local" / "residual" / shard).read_bytes()


def test_a_corrupt_header_on_the_hub_fails_before_anything_is_written(hub, tmp_path, monkeypatch):
    def header(repo_id, revision, name):
        return b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}", 1000

    monkeypatch.setattr(checkpoint, "hub_header", header)
    with pytest.raises(FormatError, match="header is not valid JSON"):
        decompose(REPO, tmp_path / "out", rank=4, progress=False)
    assert not (tmp_path / "out").exists() and hub["arrived"] == []


def test_offline_without_the_shards_in_the_cache(hub, monkeypatch):
    monkeypatch.setattr(checkpoint, "hub_header", REAL_HUB_HEADER)  # HF_HUB_OFFLINE=1 (conftest): no request
    with pytest.raises(InputNotFoundError, match=r"acme/streamed: shard .* is not in the local cache .*HF_HUB_OFFLINE"):
        Checkpoint.open(REPO)


@pytest.mark.parametrize("pad", [0, 150_000])  # a header within the first 100 kB, and one past it
def test_hub_header_is_read_with_range_requests(tmp_path, monkeypatch, pad):
    """`hub_header` through huggingface_hub's own HTTP client, the Hub replaced by a transport serving ranges."""
    import httpx2
    import torch
    from safetensors.torch import save_file

    from ailora_tools.io.tensorio import parse_header, read_header

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path), metadata={"pad": "x" * pad})
    data, seen = path.read_bytes(), []

    def serve(request):
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        seen.append((request.url.path, first, last))
        body = data[first : last + 1]
        served = f"bytes {first}-{first + len(body) - 1}/{len(data)}"
        return httpx2.Response(206, content=body, headers={"content-range": served})

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    head, size = REAL_HUB_HEADER(
        REPO, COMMIT, "model.safetensors", session=httpx2.Client(transport=httpx2.MockTransport(serve))
    )
    expected = read_header(path)
    got = parse_header(path, head, size)
    assert (got.raw, got.tensors, got.metadata, got.data_start, got.size) == (
        expected.raw,
        expected.tensors,
        expected.metadata,
        expected.data_start,
        expected.size,
    )
    n = expected.data_start
    assert seen == [(f"/{REPO}/resolve/{COMMIT}/model.safetensors", 0, 99_999)] + (
        [(f"/{REPO}/resolve/{COMMIT}/model.safetensors", 100_000, n - 1)] if n > 100_000 else []
    )
    assert len(seen) == (2 if pad else 1)
