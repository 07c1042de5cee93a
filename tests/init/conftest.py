"""The init tests' shared models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ailora_tools.demo import build_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The demo's tokenizer on a smaller Llama (2 layers, hidden 64, GQA), in shards."""
    path = build_tiny_model(tmp_path_factory.mktemp("llama") / "base")
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    config = LlamaConfig.from_pretrained(path)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    return path
