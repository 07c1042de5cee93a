"""corda, lora-ga and eva calibrate at a peak memory flat in depth, as LoRA-DA does: the same model shapes at 2 and 24
layers (every layer's q/v/down projections targeted) hold no more at their peak, beyond the factors kept for the new
layers (the output itself), than half a layer's weights in tensors and 64 KB a layer of Python objects.

What is held is counted (`ailora_tools.testing.held`: live tensor bytes from torch's allocation events, the Python
heap from tracemalloc), not read off RSS: RSS moved by megabytes between runs on a loaded machine (corda's growth
from 2 to 24 layers measured 1.9 MB alone, 7.3 MB beside a test run; 1.6 to 9.9 MB with glibc's adaptive mmap
threshold fixed or not), while the counts are the same from run to run."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.testing.synthetic import synthetic_llama

SHAPE = dict(hidden=128, inter=512, kv=2, vocab=512, head_dim=32, per_shard=4)
#: one layer's float32 weights (what is held at once)
WEIGHTS = 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 512)
#: Python objects per layer: the model's skeleton on the meta device holds each layer's modules (about 45 KB a layer
#: measured, shared with LoRA-DA's calibration)
PER_LAYER_PYTHON = 64 << 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    tok = build_tiny_model(root / "tok")
    made = {}
    for layers in (2, 24):
        made[layers] = path = root / f"l{layers}"
        synthetic_llama(path, layers=layers, **SHAPE)
        for f in tok.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, path / f.name)
    assert sum(p.stat().st_size for p in made[24].glob("*.safetensors")) > 20 * WEIGHTS
    return made


PROBED: dict = {}


def probe(models, layers: int, method: str, hold: int = 0) -> dict:
    """The probe's report, run once per (layers, method, hold) in this session."""
    if (layers, method, hold) in PROBED:
        return PROBED[layers, method, hold]
    command = [sys.executable, "-m", "ailora_tools.testing.inits_memprobe", str(models[layers]), method]
    command += [str(data_file("demo_train.jsonl")), str(models[2])] + ([str(hold)] if hold else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["modules"] == 3 * layers
    PROBED[layers, method, hold] = found
    return found


def growth(shallow: dict, deep: dict) -> tuple[int, int]:
    """(tensor bytes beyond the factors kept, Python bytes) the 22 more layers add to the peak."""
    tensors = deep["tensors"] - shallow["tensors"] - (deep["kept"] - shallow["kept"])
    return tensors, deep["python"] - shallow["python"]


@pytest.mark.parametrize("method", ["corda", "lora-ga", "eva"])
def test_peak_memory_is_flat_from_2_to_24_layers(models, method):
    shallow, deep = probe(models, 2, method), probe(models, 24, method)
    tensors, python = growth(shallow, deep)
    # 22 more layers hold 22 layers of weights (21 MB here) if anything keeps them (measured: 0 B beyond the factors)
    assert tensors <= WEIGHTS // 2, (shallow, deep)
    assert python <= 22 * PER_LAYER_PYTHON, (shallow, deep)


def test_the_probe_catches_a_tensor_kept_per_layer(models):
    """A quarter of a layer's weights kept for every layer (5.4 MB over 24) shows in the count."""
    shallow, leaky = probe(models, 2, "corda"), probe(models, 24, "corda", hold=WEIGHTS // 4)
    assert growth(shallow, leaky)[0] > 20 * WEIGHTS // 4, (shallow, leaky)
