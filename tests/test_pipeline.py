"""The streaming pipeline under decompose and merge: copy plans, incremental digests, background threads,
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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ailora_tools.background import NICE, io_pool
from ailora_tools.hashing import FileDigest, file_digest
from ailora_tools.tensorio import layout, read_header


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
        inside = covered[offsets[name]:offsets[name] + t.nbytes]
        assert all(not c for c in inside) if name in replaced else all(inside)
    assert sum(covered) == header.size - sum(header.tensors[n].nbytes for n in replaced)
    assert all(runs[i][0] + runs[i][2] < runs[i + 1][0] for i in range(len(runs) - 1))  # adjacent runs merged


def test_layout_with_a_dtype_change_rewrites_the_header(shard, tmp_path):
    header = read_header(shard)
    head, offsets, runs = layout(header, {"t2": "F32"})
    out = tmp_path / "o.safetensors"
    data = shard.read_bytes()
    buf = bytearray(offsets["t5"] + header.tensors["t5"].nbytes)
    buf[:len(head)] = head
    for s, d, n in runs:
        buf[d:d + n] = data[s:s + n]
    buf[offsets["t2"]:offsets["t2"] + 4 * 5 * 5] = torch.full((5, 5), 7.0).numpy().tobytes()
    out.write_bytes(bytes(buf))
    rewritten = read_header(out)
    assert rewritten.tensors["t2"].dtype == "F32" and rewritten.tensors["t3"].dtype == "BF16"
    got, ref = load_file(str(out)), load_file(str(shard))
    assert torch.equal(got["t2"], torch.full((5, 5), 7.0))
    assert all(torch.equal(got[k], ref[k]) for k in ref if k != "t2")


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 3 * 4096 + 17), cuts=st.lists(st.integers(0, 3 * 4096 + 17), max_size=6))
def test_incremental_digest_equals_the_whole_file_digest(tmp_path_factory, size, cuts):
    path = tmp_path_factory.mktemp("d") / "f"
    path.write_bytes(os.urandom(size))
    d = FileDigest(path)
    for c in sorted(min(c, size) for c in cuts):
        d.update_to(c)
    assert d.finish() == file_digest(path) == "blake3:" + blake3(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are reniced on Linux only")
def test_io_threads_run_at_lower_priority():
    pool = io_pool(1, "t")
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        worker = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        pool.shutdown()
    assert worker == min(own + NICE, 19) and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own


def test_decompose_loads_torch_only_after_the_copies_start(tiny, tmp_path):
    """The 1.2 s torch import overlaps with copying: nothing before the first target read needs torch."""
    code = (
        "import sys\n"
        "from ailora_tools import rewrite, tensorio\n"
        "started = []\n"
        "orig = rewrite._start\n"
        "def spy(*a, **k):\n"
        "    started.append('torch' in sys.modules)\n"
        "    return orig(*a, **k)\n"
        "rewrite._start = spy\n"
        "from ailora_tools.decomposition import decompose\n"
        f"decompose({str(tiny('llama'))!r}, {str(tmp_path / 'out')!r}, rank=4, device='auto', progress=False)\n"
        "print(started)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("[False")
    svd = json.loads((tmp_path / "out" / "ailora.json").read_text())["svd"]
    assert svd["device"] == "auto" and svd["ran_on"] == "cpu"


@pytest.mark.parametrize("args,code", [(["--version"], 0), (["decompose"], 2), (["verify", "/nonexistent/out"], 1)])
def test_console_entry_point_keeps_exit_codes(args, code):
    proc = subprocess.run([sys.executable, "-c", "from ailora_tools.cli import run; run()", *args],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == code, proc.stderr
    assert (proc.stdout + proc.stderr).strip()  # output was flushed before the fast exit
