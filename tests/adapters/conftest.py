"""Fixtures of the adapter tests: a decomposition whose residual is NF4-quantised, with an adapter trained on it."""

import pytest
import torch
from helpers import DECODER, spm_tokenizer
from helpers.adapters import QUANTIZED_TARGETS, fake_training, quantize_residual
from transformers import LlamaConfig, LlamaForCausalLM

from ailora_tools import decompose


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama (hidden 128: W4A16 groups of 128) with a sentencepiece tokenizer, decomposed (PiSSA, r 4) with
    its q/v residual quantised to NF4, and an adapter 'trained' on it."""

    root = tmp_path_factory.mktemp("qserve")
    torch.manual_seed(0)
    config = LlamaConfig(**dict(DECODER, hidden_size=128, intermediate_size=256))
    LlamaForCausalLM(config).save_pretrained(root / "model", max_shard_size="200KB")
    spm_tokenizer(root / "model")
    decompose(root / "model", root / "dec", method="pissa", rank=4, alpha=8, targets=QUANTIZED_TARGETS, progress=False)
    quantize_residual(root / "dec")
    fake_training(root / "dec" / "adapter", root / "trained", scale=0.05)
    return root
