"""LoRA-DA calibration: layer-wise statistics equal a whole-model pass with hooks; determinism; bounded memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DECODER
from helpers.calibration import ATTN, MODULES, assert_matches_reference, run
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ailora_tools.errors import AiloraError, FormatError, TargetError, UnsupportedError
from ailora_tools.init.lora_da.calibration import memory_bound
from ailora_tools.io.examples import IGNORE, Example
from ailora_tools.testing.calibration_reference import reference_statistics


def dataset(seed: int = 0, n: int = 6, vocab: int = 128) -> list[Example]:
    """Samples of different lengths whose first tokens are a prompt without loss, and one with no loss at all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (7 + 3 * i,), generator=g).tolist()
        prompt = 2 + i % 4
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    out.insert(2, Example([5, 6, 7, 8], [IGNORE] * 4))
    return out


@pytest.mark.parametrize("token_mask", ["attention", "labels"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_statistics_equal_whole_model_hooks(tiny, kind, token_mask):
    examples = dataset()
    ref = reference_statistics(tiny(kind), examples, MODULES, token_mask=token_mask)
    for batch_size in (1, 3):  # 3: right-padded micro-batches of different lengths
        got = run(tiny(kind), examples, token_mask=token_mask, batch_size=batch_size)
        assert list(got) == [m for m in MODULES if ".1." in m] + [m for m in MODULES if ".0." in m]  # top layer first
        assert_matches_reference(got, ref)
        s = got["model.layers.1.self_attn.q_proj"]
        assert s.samples == 6 and s.skipped == 1
        prompt_tokens = sum(2 + i % 4 for i in range(6))
        all_tokens = sum(7 + 3 * i for i in range(6))
        assert s.tokens == (all_tokens if token_mask == "attention" else all_tokens - prompt_tokens)
        for layer in range(2):  # q, k and v read one input: one Z, computed once, the same tensor
            q, k, v = (got[f"model.layers.{layer}.{m}"] for m in ATTN)
            assert q.input_factor is k.input_factor is v.input_factor and q.input_key == k.input_key == v.input_key
            assert got[f"model.layers.{layer}.mlp.up_proj"].input_factor is not q.input_factor


def sliding_mistral(path):
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**DECODER, sliding_window=4)).save_pretrained(path, max_shard_size="40KB")
    return path


def sliding_tied_qwen2(path):  # layer 0 full attention, layers 1-2 a 4-token window; lm_head tied, not stored
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            **dict(DECODER, num_hidden_layers=3),
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            tie_word_embeddings=True,
        )
    )
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    model.save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.mark.parametrize("build", [sliding_mistral, sliding_tied_qwen2])
def test_sliding_windows_and_tied_head_equal_whole_model_hooks(tmp_path, build):
    path = build(tmp_path / "model")
    modules = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.v_proj", "mlp.gate_proj")]
    examples = dataset()  # samples of up to 22 tokens: the 4-token window matters
    ref = reference_statistics(path, examples, modules)
    for batch_size in (1, 4):
        assert_matches_reference(run(path, examples, modules, batch_size=batch_size), ref)


def test_backward_stops_at_lowest_target_layer_and_spills_exactly(tiny, tmp_path):
    """Targets only in the top layer: still the reference's statistics. Nothing in RAM: the same bits via files."""
    modules = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    examples = dataset()
    in_ram = run(tiny("llama"), examples, modules, batch_size=2)
    assert_matches_reference(in_ram, reference_statistics(tiny("llama"), examples, modules))
    spilled = run(tiny("llama"), examples, modules, batch_size=2, activation_budget=0, scratch=tmp_path)
    for name in modules:
        assert torch.equal(in_ram[name].gradient, spilled[name].gradient)
        assert torch.equal(in_ram[name].input_factor, spilled[name].input_factor)
    assert list(tmp_path.iterdir()) == []  # the spill directory is removed


def test_same_input_gives_identical_bits_and_other_data_other_statistics(tiny):
    first, second = run(tiny("qwen2"), dataset()), run(tiny("qwen2"), dataset())
    other = run(tiny("qwen2"), dataset(seed=1))
    for name in MODULES:
        for field in ("input_factor", "output_factor", "gradient"):
            assert torch.equal(getattr(first[name], field), getattr(second[name], field))
        assert not torch.allclose(first[name].gradient, other[name].gradient, rtol=0.1, atol=0)


def test_bfloat16_checkpoint(tiny):
    """A bfloat16 checkpoint computes in bfloat16 by default (statistics still float32); dtype="float32" upcasts."""
    path, examples, modules = tiny("llama", torch.bfloat16), dataset(), MODULES[:3]
    exact = run(path, examples, modules, dtype="float32")
    assert_matches_reference(exact, reference_statistics(path, examples, modules, dtype=torch.float32))
    fast = run(path, examples, modules)
    for name in modules:
        assert fast[name].gradient.dtype == torch.float32
        rel = (fast[name].gradient - exact[name].gradient).norm() / exact[name].gradient.norm()
        assert 0 < rel < 0.05


def test_bad_input_is_one_clear_line(tiny):
    cases = [
        (
            lambda: run(tiny("gpt2"), dataset(vocab=100), ["transformer.h.0.attn.c_attn"]),
            UnsupportedError,
            r"model_type 'gpt2' is not supported by LoRA-DA calibration; supported: llama, mistral, qwen2",
        ),
        (
            lambda: run(tiny("llama"), [Example([4, 5, 6], [IGNORE] * 3), Example([7, 8], [7, IGNORE])]),
            FormatError,
            r"none of the 2 samples has a loss token",
        ),
        (
            lambda: run(tiny("llama"), dataset(), ["model.layers.0.self_attn.q_proj", "lm_head"]),
            TargetError,
            r"lm_head: not a linear module inside a decoder layer",
        ),
        (
            lambda: run(tiny("llama"), dataset(), ["model.layers.2.self_attn.q_proj"]),
            TargetError,
            r"model.layers.2.self_attn.q_proj: not a linear module inside a decoder layer",
        ),
        (
            lambda: run(tiny("llama"), [Example([4, 500], [4, 500])]),
            FormatError,
            r"sample 0: token id 500 is outside the model's vocabulary of 128",
        ),
        (lambda: run(tiny("llama"), dataset(), token_mask="loss"), UnsupportedError, r"token_mask 'loss'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as info:
            call()
        assert isinstance(info.value, AiloraError) and "\n" not in str(info.value)


@pytest.mark.slow
def test_peak_memory_stays_within_stated_bound(tmp_path):
    """Module docstring bound, on a 136-layer checkpoint more than 10x the bound; nothing fits the activation budget."""
    from ailora_tools.testing.synthetic import synthetic_llama

    src = synthetic_llama(tmp_path / "deep", layers=136, hidden=256, inter=2048, kv=2, vocab=1024, per_shard=16)
    size = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 68, 135) for m in ("q_proj", "v_proj")]
    options = {
        "modules": modules,
        "samples": 4,
        "tokens": 24,
        "prompt": 8,
        "batch_size": 2,
        "activation_budget": 1 << 20,
        "scratch": str(tmp_path),
    }
    bound = memory_bound(
        json.loads((Path(src) / "config.json").read_text()),
        modules,
        batch_size=2,
        max_tokens=24,
        activation_budget=1 << 20,
    )
    assert size >= 10 * bound
    out = subprocess.run(
        [sys.executable, "-m", "ailora_tools.testing.calibration_memprobe", str(src), json.dumps(options)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )  # as the CLI sets it: spinning is slow here
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["modules"] == len(modules)
    assert probe["peak"] - probe["baseline"] <= bound, (probe, bound)
