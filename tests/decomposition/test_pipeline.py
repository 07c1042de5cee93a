"""The streaming pipeline under decompose and merge: copy plans, tensor-wise digests, background threads,
torch loading after the copies start, and the console entry point's exit codes."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from helpers import expected_digest
from safetensors.torch import load_file, save_file

from ailora_tools import decompose, merge
from ailora_tools.io.background import NICE, io_pool
from ailora_tools.io.hashing import file_digest, hash_file
from ailora_tools.io.tensorio import layout, read_header
from ailora_tools.verify import verify


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shard") / "s.safetensors"
    save_file({f"t{i}": torch.full((3 + i, 5), float(i), dtype=torch.bfloat16) for i in range(6)}, str(path))
    return path


@pytest.mark.parametrize("replaced", [[], ["t0"], ["t2", "t3"], ["t5", "t1"], ["t0", "t1", "t2", "t3", "t4", "t5"]])
def test_layout_copies_everything_but_the_replaced_ranges(shard, replaced):
    header = read_header(shard)
    head, offsets, runs = layout(header, {n: "BF16" for n in replaced})
    assert head == b""  # no dtype change: the header is copied as is
    covered = [False] * header.size
    for s, d, n in runs:
        assert s == d and n > 0
        for i in range(s, s + n):
            assert not covered[i]
            covered[i] = True
    for name, t in header.tensors.items():
        inside = covered[offsets[name] : offsets[name] + t.nbytes]
        assert all(not c for c in inside) if name in replaced else all(inside)
    assert sum(covered) == header.size - sum(header.tensors[n].nbytes for n in replaced)
    assert all(runs[i][0] + runs[i][2] < runs[i + 1][0] for i in range(len(runs) - 1))  # adjacent runs merged


def test_layout_with_a_dtype_change_rewrites_the_header(shard, tmp_path):
    header = read_header(shard)
    head, offsets, runs = layout(header, {"t2": "F32"})
    out = tmp_path / "o.safetensors"
    data = shard.read_bytes()
    buf = bytearray(offsets["t5"] + header.tensors["t5"].nbytes)
    buf[: len(head)] = head
    for s, d, n in runs:
        buf[d : d + n] = data[s : s + n]
    buf[offsets["t2"] : offsets["t2"] + 4 * 5 * 5] = torch.full((5, 5), 7.0).numpy().tobytes()
    out.write_bytes(bytes(buf))
    rewritten = read_header(out)
    assert rewritten.tensors["t2"].dtype == "F32" and rewritten.tensors["t3"].dtype == "BF16"
    got, ref = load_file(str(out)), load_file(str(shard))
    assert torch.equal(got["t2"], torch.full((5, 5), 7.0))
    assert all(torch.equal(got[k], ref[k]) for k in ref if k != "t2")


def test_layout_renames_in_the_header_and_keeps_every_byte(shard, tmp_path):
    """A bare base that gets a head is written with the prefix: names change, offsets are by source name."""
    header = read_header(shard)
    renamed = {n: f"bert.{n}" for n in header.tensors}
    head, offsets, runs = layout(header, {"t4": "BF16"}, {"head": ("F32", (2, 3))}, renamed)
    assert head  # a new header, though no dtype changes
    data, buf = shard.read_bytes(), bytearray(offsets["head"] + 4 * 6)
    buf[: len(head)] = head
    for s, d, n in runs:
        buf[d : d + n] = data[s : s + n]
    buf[offsets["t4"] : offsets["t4"] + header.tensors["t4"].nbytes] = (
        torch.full((7, 5), 9.0, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    buf[offsets["head"] :] = torch.ones(2, 3).numpy().tobytes()
    (tmp_path / "o.safetensors").write_bytes(bytes(buf))
    got, ref = load_file(str(tmp_path / "o.safetensors")), load_file(str(shard))
    assert set(got) == {f"bert.{k}" for k in ref} | {"head"}
    assert torch.equal(got["bert.t4"], torch.full((7, 5), 9.0, dtype=torch.bfloat16))
    assert torch.equal(got["head"], torch.ones(2, 3))
    assert all(torch.equal(got[f"bert.{k}"], ref[k]) for k in ref if k != "t4")
    with pytest.raises(ValueError, match="two tensors would be named 't1'"):
        layout(header, {}, None, {"t0": "t1"})


def _with_gap(path: Path) -> Path:
    """A valid safetensors file with 4 unused bytes between its two tensors."""
    import json
    import struct

    a, b = torch.arange(6, dtype=torch.float32), torch.arange(4, dtype=torch.float32) + 10
    doc = {
        "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [28, 44]},
    }
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + a.numpy().tobytes() + b"\xde\xad\xbe\xef" + b.numpy().tobytes())
    return path


def test_tensorwise_digest_covers_every_byte(shard, tmp_path):
    gap = _with_gap(tmp_path / "gap.safetensors")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    for path in (shard, gap, other):
        assert file_digest(path) == expected_digest(path)
    assert file_digest(shard).startswith("blake3-tensors:") and file_digest(other).startswith("blake3:")
    data = gap.read_bytes()
    for i in range(0, len(data), 7):  # any changed byte, header, tensor or gap, changes the digest
        (tmp_path / "x.safetensors").write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
        assert file_digest(tmp_path / "x.safetensors") != file_digest(gap)


def test_patched_digest_equals_the_digest_of_the_patched_file(shard, tmp_path):
    header, source = read_header(shard), hash_file(shard)
    t = header.tensors["t3"]
    start, end = header.data_start + t.begin, header.data_start + t.end
    new = bytes(range(end - start))
    data = bytearray(shard.read_bytes())
    data[start:end] = new
    (tmp_path / "p.safetensors").write_bytes(bytes(data))
    assert source.patched({(start, end): blake3(new).digest()}) == file_digest(tmp_path / "p.safetensors")
    with pytest.raises(ValueError):
        source.patched({(start, end + 1): blake3(new).digest()})


def test_unreadable_safetensors_is_hashed_plainly(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    assert file_digest(bad) == "blake3:" + blake3(bad.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_merge_outputs_verify(tiny, tmp_path, dtype):
    """Same layout: digests from the source's; a dtype change: the written file is hashed. Both verify."""
    decompose(tiny("llama"), tmp_path / "d", rank=4, progress=False)
    merge(tmp_path / "d" / "residual", tmp_path / "d" / "adapter", tmp_path / "m", dtype=dtype, progress=False)
    report = verify(tmp_path / "m")
    assert report["problems"] == [] and report["files_checked"] >= 3
    files = json.loads((tmp_path / "m" / "ailora-merge.json").read_text())["files"]["output"]
    assert all(d == expected_digest(tmp_path / "m" / rel) for rel, d in files.items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are reniced on Linux only")
def test_io_threads_run_at_lower_priority():
    pool = io_pool(1, "t")
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        worker = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        pool.shutdown()
    assert worker == min(own + NICE, 19) and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own


@pytest.mark.slow
def test_decompose_loads_torch_only_after_the_copies_start(tiny, tmp_path):
    """The 1.2 s torch import overlaps with copying: nothing before the first target read needs torch."""
    code = (
        "import sys\n"
        "from ailora_tools.io import rewrite\n"
        "started = []\n"
        "orig = rewrite.copy_ranges\n"
        "def spy(*a, **k):  # a shard's copy starts\n"
        "    started.append('torch' in sys.modules)\n"
        "    return orig(*a, **k)\n"
        "rewrite.copy_ranges = spy\n"
        "from ailora_tools.decomposition import decompose\n"
        f"decompose({str(tiny('llama'))!r}, {str(tmp_path / 'out')!r}, rank=4, device='auto', progress=False)\n"
        "print(started)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("[False")
    svd = json.loads((tmp_path / "out" / "ailora.json").read_text())["svd"]
    assert svd["device"] == "auto" and svd["ran_on"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("args,code", [(["--version"], 0), (["decompose"], 1), (["verify", "/nonexistent/out"], 1)])
def test_console_entry_point_keeps_exit_codes(args, code):
    proc = subprocess.run(
        [sys.executable, "-c", "from ailora_tools.cli import run; run()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == code, proc.stderr
    assert (proc.stdout + proc.stderr).strip()  # output was flushed before the fast exit


def test_parallel_copies_and_hashing_give_the_same_outputs_and_digests(tiny, tmp_path, monkeypatch):
    """With several I/O threads (a machine with many cores) shards are copied by several workers at once and
    large segments hashed on several threads; every byte and every digest is the same as with one."""
    from ailora_tools.io import background, hashing, rewrite

    src = tiny("llama")
    decompose(src, tmp_path / "one", rank=4, progress=False)
    hashing.forget_digests()  # hash the sources again, on several threads
    monkeypatch.setattr(background, "IO_THREADS", 4)
    monkeypatch.setattr(rewrite, "IO_THREADS", 4)
    monkeypatch.setattr(hashing, "PARALLEL_BYTES", 1024)
    threads, real_blake3 = [], hashing.blake3
    monkeypatch.setattr(
        hashing,
        "blake3",
        lambda *a, max_threads=1: threads.append(max_threads) or real_blake3(*a, max_threads=max_threads),
    )
    barrier, lock, met, real_copy = threading.Barrier(2, timeout=30), threading.Lock(), [], rewrite.copy_ranges

    def copy(*args):
        with lock:
            first = len(met) < 2
            met.append(None)
        if first:  # the first two shards' copies meet here only if two workers copy at once
            try:
                barrier.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)
        return real_copy(*args)

    monkeypatch.setattr(rewrite, "copy_ranges", copy)
    decompose(src, tmp_path / "four", rank=4, progress=False)
    assert met.count(True) == 2 and False not in met
    assert 4 in threads and 1 in threads  # large segments and buffers on 4 threads, small ones on one
    one, four = (json.loads((tmp_path / d / "ailora.json").read_text()) for d in ("one", "four"))
    assert one["files"]["source"] == four["files"]["source"]
    assert one["files"]["output"].keys() == four["files"]["output"].keys()
    for rel, digest in four["files"]["output"].items():
        assert digest == expected_digest(tmp_path / "four" / rel)
        if rel != "adapter/adapter_config.json":  # that one names its own output directory
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "four" / rel).read_bytes()
            assert digest == one["files"]["output"][rel]


def test_io_threads_scale_with_the_cores(monkeypatch):
    from ailora_tools.io import background

    monkeypatch.delenv("AILORA_IO_THREADS", raising=False)
    found = {}
    for cores in (1, 2, 4, 7, 8, 16, 64):
        found[cores] = background.io_threads(cores)
    assert found == {1: 1, 2: 1, 4: 1, 7: 1, 8: 2, 16: 4, 64: 8}  # up to 7 cores: as on the 2-core machine
    for value, threads in (("3", 3), ("0", 8), ("many", 8)):
        monkeypatch.setenv("AILORA_IO_THREADS", value)
        assert background.io_threads(32) == threads
