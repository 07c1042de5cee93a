"""Fixtures and hooks shared by every test: tiny real models (several shards each), built once per session. Nothing
reaches the network. Plain helpers are in tests/helpers (imported as `helpers`)."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import build_model  # noqa: E402
from helpers.encoders import build_encoder  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from ailora_tools.demo import TINY_LLAMA, build_tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(kind, dtype=float32) -> path of a cached tiny multi-shard model."""
    cache = {}

    def get(kind: str, dtype=torch.float32):
        key = (kind, dtype)
        if key not in cache:
            cache[key] = build_model(kind, tmp_path_factory.mktemp(f"{kind}-{str(dtype)[6:]}"), dtype=dtype)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """encoder(kind) -> path of a cached tiny encoder with its tokenizer (`helpers.encoders.build_encoder`)."""
    cache = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_encoder(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama (no bias terms) and a tiny Qwen2 (q/k/v biases): the demo's model and its config at half the
    width and depth, sharing its tokenizer."""
    root = tmp_path_factory.mktemp("bitfit")
    llama = build_tiny_model(root / "llama")
    vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(**dict(TINY_LLAMA, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    )
    qwen.save_pretrained(root / "qwen2", max_shard_size="100KB")
    for f in llama.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, root / "qwen2" / f.name)
    return {"llama": llama, "qwen2": root / "qwen2", "root": root}
