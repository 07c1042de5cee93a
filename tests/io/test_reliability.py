"""Reliability: bad input, property-based parsing, kill + resume, ENOSPC, locks."""

import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import load, logits
from helpers.processes import run_killed, tree_hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import save_file

from ailora_tools import decompose
from ailora_tools.cli import main
from ailora_tools.errors import AiloraError, FormatError
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.tensorio import read_header
from ailora_tools.testing.synthetic import synthetic_llama


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def copy_model(tiny, kind, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(tiny(kind), dst)
    return dst


def first_shard_with(model: Path, tensor: str) -> Path:
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def rewrite_header(shard: Path, mutate) -> None:
    """Replace a shard's JSON header by mutate(doc), keeping the data buffer."""
    h = read_header(shard)
    data = shard.read_bytes()[h.data_start :]
    doc = json.loads(h.raw)
    js = json.dumps(mutate(doc)).encode()
    shard.write_bytes(struct.pack("<Q", len(js)) + js + data)


Q0 = "model.layers.0.self_attn.q_proj.weight"


def _truncate(m):
    s = first_shard_with(m, Q0)
    s.write_bytes(s.read_bytes()[:-100])


def _header_len_lies(m):
    s = first_shard_with(m, Q0)
    b = s.read_bytes()
    s.write_bytes(struct.pack("<Q", 10**9) + b[8:])


def _header_json_lies(m):
    s = first_shard_with(m, Q0)
    b = bytearray(s.read_bytes())
    b[8] = ord("[")
    s.write_bytes(bytes(b))


def _overlap(m):
    def mut(doc):  # slide the last tensor 4 bytes back, into its neighbour
        last = max((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])
        doc[last]["data_offsets"] = [o - 4 for o in doc[last]["data_offsets"]]
        return doc

    rewrite_header(first_shard_with(m, Q0), mut)


def _past_end(m):
    def mut(doc):
        b, e = doc[Q0]["data_offsets"]
        doc[Q0]["data_offsets"] = [b + 10**6, e + 10**6]
        return doc

    rewrite_header(first_shard_with(m, Q0), mut)


def _index(mutate):
    def apply(m):
        p = m / "model.safetensors.index.json"
        doc = json.loads(p.read_text())
        p.write_text(mutate(doc) if callable(mutate) else mutate)

    return apply


def _escape(doc):
    doc["weight_map"][Q0] = "../evil.safetensors"
    return json.dumps(doc)


def _missing_shard(doc):
    doc["weight_map"][Q0] = "model-99999-of-99999.safetensors"
    return json.dumps(doc)


def _twice(doc):
    text = json.dumps(doc)
    return text.replace('"weight_map": {', f'"weight_map": {{"{Q0}": "{doc["weight_map"][Q0]}", ', 1)


def _int8(m):
    s = first_shard_with(m, Q0)
    from safetensors import safe_open

    with safe_open(str(s), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[Q0] = (tensors[Q0] * 100).to(torch.int8)
    save_file(tensors, str(s))


def _nan(m):
    s = first_shard_with(m, Q0)
    from safetensors import safe_open

    with safe_open(str(s), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[Q0][3, 5] = float("nan")
    save_file(tensors, str(s))


def _no_weights(m):
    for p in m.glob("*.safetensors*"):
        p.unlink()


def _pickle_only(m):
    sd = load(m, "llama").state_dict()
    for p in m.glob("*.safetensors*"):
        p.unlink()
    torch.save(sd, m / "pytorch_model.bin")


BAD_MODELS = {
    "truncated": (_truncate, r"truncated"),
    "header length lies": (_header_len_lies, r"header length 1000000000 runs past the file"),
    "header json lies": (_header_json_lies, r"header is not valid JSON"),
    "offsets overlap": (_overlap, r"overlap in the data buffer"),
    "offsets past the file": (_past_end, r"q_proj.weight' ends at byte .* the file is truncated"),
    "index escapes the dir": (_index(_escape), r"sends .* to '\.\./evil\.safetensors', outside the model directory"),
    "index names a missing shard": (
        _index(_missing_shard),
        r"shard model-99999-of-99999.safetensors named by the index is missing",
    ),
    "index names a tensor twice": (_index(_twice), r"names .*q_proj.weight' twice"),
    "int8 target": (_int8, r"q_proj.weight' has dtype I8; decompose supports F64, F32, F16, BF16"),
    "nan in target": (_nan, r"q_proj.weight' holds NaN or Inf"),
    "no weights": (_no_weights, r"no \*\.safetensors weights"),
    "pickle only": (_pickle_only, r"only pickled weights .* --allow-pickle"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_checkpoint_is_refused_with_one_line(tiny, tmp_path, case):
    corrupt, message = BAD_MODELS[case]
    model = copy_model(tiny, "llama", tmp_path)
    corrupt(model)
    code, out = cli("decompose", model, "-o", tmp_path / "out", "--rank", "4", "--quiet")
    assert code == 1, out
    assert out.startswith("error: ") and out.count("\n") == 1 and "Traceback" not in out
    import re

    assert re.search(message, out), out
    assert not (tmp_path / "out" / "ailora.json").exists()
    assert not (tmp_path / "out").exists() or case == "nan in target"  # refused before writing, or left incomplete


def test_allow_pickle_loads_with_weights_only(tiny, tmp_path):
    model = copy_model(tiny, "llama", tmp_path)
    _pickle_only(model)
    code, out = cli("decompose", model, "-o", tmp_path / "out", "--rank", "4", "--quiet", "--allow-pickle")
    assert code == 0, out
    got = logits(
        PeftModel.from_pretrained(load(tmp_path / "out" / "residual", "llama"), tmp_path / "out" / "adapter"), "llama"
    )
    assert (got - logits(load(tiny("llama"), "llama"), "llama")).abs().max() <= 1e-4
    import gc

    gc.collect()
    assert not list(tmp_path.glob(".ailora-unpickled-*"))  # the scratch copy goes with the Checkpoint


@pytest.mark.parametrize(
    "args,message",
    [
        (["decompose", "{missing}", "-o", "{out}"], r"missing: no such directory"),
        (["decompose", "{llama}", "-o", "{out}", "--rank", "40"], r"--rank 40: .* so rank must be below 32"),
        (["decompose", "{llama}", "-o", "{out}", "--targets", "nope"], r"'nope' matches no module .* q_proj"),
        (["decompose", "{llama}", "-o", "{llama}/inside"], r"lies inside the input"),
        (
            ["decompose", "{llama}", "-o", "{out}", "--device", "gpu"],
            r"--device 'gpu': not a device; use auto, cpu, cuda",
        ),
        (
            ["decompose", "{llama}", "-o", "{out}", "--device", "cuda:7"],
            r"--device cuda:7: (CUDA is not available|this machine has)",
        ),
        (
            ["convert", "--trained", "{missing}", "-o", "{out}"],
            r"missing: no ailora-train.json naming the initial adapter; pass --initial",
        ),
        (["merge", "{missing}", "{adapter}", "-o", "{out}"], r"missing: no such directory"),
        (["merge", "{bert}", "{adapter}", "-o", "{out}"], r"adapts module .* but the base .* has no tensor"),
        (
            ["train", "--base", "{bert}", "--adapter", "{adapter}", "--data", "{data}", "-o", "{out}"],
            r"adapts module .* but the base .* has no tensor",
        ),
        (["export-gguf", "{missing}", "--base", "{llama}", "-o", "{out}"], r"missing: no adapter_config.json"),
        (["export-gguf", "{lora}", "--base", "{missing}", "-o", "{out}"], r"--base .*missing: no config.json"),
        (["export-gguf", "{lora}", "--base", "{llama}", "-o", "{lora}/a.gguf"], r"lies inside the input"),
        (["push", "{missing}", "--repo-id", "me/x", "--dry-run"], r"missing: no such directory, or it is empty"),
        (
            ["train", "--base", "{llama}", "--adapter", "{adapter}", "--data", "{missing}", "-o", "{out}"],
            r"--data .*missing: no such data file",
        ),
        (
            ["train", "--base", "{llama}", "--adapter", "{lora}", "--data", "{data}", "-o", "{out}"],
            r"no tokenizer files",
        ),
    ],
)
def test_bad_arguments_are_refused_with_one_line(tiny, tmp_path, args, message):
    import re

    llama = copy_model(tiny, "llama", tmp_path, "llama")
    decompose(llama, tmp_path / "dec", rank=4, progress=False)
    decompose(llama, tmp_path / "plain", rank=4, method="lora", progress=False)  # applies to the original
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    fill = {
        "missing": tmp_path / "missing",
        "out": tmp_path / "out",
        "llama": llama,
        "bert": tiny("bert"),
        "adapter": tmp_path / "dec" / "adapter",
        "lora": tmp_path / "plain" / "adapter",
        "data": tmp_path / "d.jsonl",
    }
    code, out = cli(*[a.format(**fill) for a in args])
    assert code == 1 and out.startswith("error: ") and out.count("\n") == 1, out
    assert re.search(message, out), out
    assert not (tmp_path / "out").exists() and not (llama / "inside").exists()
    assert not (tmp_path / "plain" / "adapter" / "a.gguf").exists()


def test_non_empty_output_needs_overwrite(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out = cli("decompose", tiny("llama"), "-o", tmp_path / "out", "--rank", "4", "--quiet")
    assert code == 1 and "exists and is not empty; pass --overwrite" in out
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, out = cli("decompose", tiny("llama"), "-o", tmp_path / "out", "--rank", "4", "--quiet", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()


# ---- property-based: the parsers never raise anything but FormatError, never hang -------------------


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256))
def test_random_bytes_give_format_error(tmp_path, blob):
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    try:
        read_header(p)
    except FormatError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.dictionaries(st.text(max_size=12), json_values, max_size=5),
    pad=st.binary(max_size=64),
    mutate=st.sampled_from(["dtype", "shape", "offsets", "entry", "none"]),
    value=json_values,
)
def test_mutated_headers_give_format_error(tmp_path, doc, pad, mutate, value):
    valid = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
    }
    key = {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}.get(mutate)
    if key:
        valid["a"][key] = value
    elif mutate == "entry":
        valid["a"] = value
    header = json.dumps({**doc, **valid}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + pad)
    try:
        read_header(p)
    except FormatError:
        pass


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=json_values | st.dictionaries(st.just("weight_map"), st.dictionaries(st.text(max_size=8), json_values)))
def test_random_index_gives_project_error(tiny, tmp_path, index):
    model = tmp_path / "m"
    if not model.exists():
        shutil.copytree(tiny("llama"), model)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        Checkpoint.open(model)
    except AiloraError:
        pass


# ---- faults: SIGKILL + resume, SIGINT, ENOSPC, lock ---------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic_llama(root / "model", layers=6, hidden=128, inter=256, kv=2, vocab=512, per_shard=1)
    return root / "model"


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(synthetic, tmp_path):
    args = ["--rank", "4", "--quiet"]
    killed = run_killed("decompose", synthetic, "-o", tmp_path / "out", *args)
    assert killed.returncode == -9
    journal = json.loads((tmp_path / "out" / ".ailora-progress.json").read_text())
    assert len(journal["done"]) == 1 and not (tmp_path / "out" / "ailora.json").exists()
    code, out = cli("decompose", synthetic, "-o", tmp_path / "out", *args)
    assert code == 1 and "--resume to finish the interrupted run" in out  # leftover never taken as done
    code, out = cli("verify", tmp_path / "out")
    assert code == 1 and "rerun the same command with --resume" in out
    code, out = cli("decompose", synthetic, "-o", tmp_path / "out", *args, "--resume")
    assert code == 0, out
    code, out = cli("decompose", synthetic, "-o", tmp_path / "straight", *args)
    assert code == 0, out
    a, b = tree_hashes(tmp_path / "out"), tree_hashes(tmp_path / "straight")
    manifest_a = json.loads((tmp_path / "out" / "ailora.json").read_text())
    manifest_b = json.loads((tmp_path / "straight" / "ailora.json").read_text())
    for m in (manifest_a, manifest_b):  # the adapter config names its own residual directory
        del m["files"]["output"]["adapter/adapter_config.json"]
    assert manifest_a == manifest_b
    location_bound = {"adapter/adapter_config.json", "ailora.json"}  # compared above, less the residual's path
    assert {k: v for k, v in a.items() if k not in location_bound} == {
        k: v for k, v in b.items() if k not in location_bound
    }
    code, out = cli("verify", tmp_path / "out")
    assert code == 0 and "12 modules checked" in out, out

    killed = run_killed(
        "merge", tmp_path / "out" / "residual", tmp_path / "out" / "adapter", "-o", tmp_path / "m", "--quiet"
    )
    assert killed.returncode == -9 and not (tmp_path / "m" / "ailora-merge.json").exists()
    code, out = cli(
        "merge",
        tmp_path / "out" / "residual",
        tmp_path / "out" / "adapter",
        "-o",
        tmp_path / "m",
        "--resume",
        "--quiet",
    )
    assert code == 0, out
    code, out = cli(
        "merge", tmp_path / "out" / "residual", tmp_path / "out" / "adapter", "-o", tmp_path / "m2", "--quiet"
    )
    assert code == 0, out
    ha, hb = tree_hashes(tmp_path / "m"), tree_hashes(tmp_path / "m2")
    assert ha.pop("ailora-merge.json") and hb.pop("ailora-merge.json") and ha == hb
    ma, mb = (json.loads((tmp_path / d / "ailora-merge.json").read_text()) for d in ("m", "m2"))
    assert ma["summary"].pop("output") != mb["summary"].pop("output") and ma == mb
    first = sorted(synthetic.glob("*.safetensors"))[0].name
    assert read_header(tmp_path / "m" / first).raw == read_header(synthetic / first).raw


def test_verify_finds_a_changed_file(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "out", rank=4, progress=False)
    code, out = cli("verify", tmp_path / "out")
    assert code == 0 and "4 modules checked" in out
    shard = sorted((tmp_path / "out" / "residual").glob("*.safetensors"))[1]
    b = bytearray(shard.read_bytes())
    b[-3] ^= 0xFF
    shard.write_bytes(bytes(b))
    code, out = cli("verify", tmp_path / "out")
    assert code == 1 and f"residual/{shard.name}: content differs" in out


def test_sigint_leaves_a_resumable_run(synthetic, tmp_path, monkeypatch):
    from ailora_tools.io import rewrite

    real, calls = rewrite.tensor_bytes, {"n": 0}

    def interrupt(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(rewrite, "tensor_bytes", interrupt)
    code, out = cli("decompose", synthetic, "-o", tmp_path / "out", "--rank", "4", "--quiet")
    assert code == 130 and "rerun with --resume" in out
    assert list((tmp_path / "out" / "residual").glob(".*.partial"))  # the shard in progress never got its name
    monkeypatch.setattr(rewrite, "tensor_bytes", real)
    code, out = cli("decompose", synthetic, "-o", tmp_path / "out", "--rank", "4", "--quiet", "--resume")
    assert code == 0 and not list((tmp_path / "out").rglob(".*.partial"))


def test_disk_full_mid_write(synthetic, tmp_path, monkeypatch):
    from ailora_tools.io import rewrite

    real, calls = rewrite.copy_ranges, {"n": 0}

    def full(src, fd, head, copies):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, fd, head, copies)

    monkeypatch.setattr(rewrite, "copy_ranges", full)
    code, out = cli("decompose", synthetic, "-o", tmp_path / "out", "--rank", "4", "--quiet")
    assert code == 1 and out.startswith("error: no space left on device") and "--resume" in out
    assert not (tmp_path / "out" / "ailora.json").exists()
    assert not (tmp_path / "out" / "residual" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.slow
def test_second_process_on_one_output_fails_at_once(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".ailora.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "ailora_tools.cli",
                "decompose",
                str(tiny("llama")),
                "-o",
                str(out),
                "--rank",
                "4",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 1 and "another ailora-tools run is writing there (locked)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".ailora.lock"]
