"""Progtuning: the stage schedule, frozen blocks that stay bit-identical, a backward pass that stops at the
lowest training block, and stages that survive --resume."""

import json

import pytest
import torch
from helpers import killed_at_update, train_dec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ailora_tools import decompose
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import OutputError, TargetError
from ailora_tools.training.progressive import (
    Progressive,
    parts,
    stage_bounds,
    stage_of,
    trainable_blocks,
    updated_fraction,
)
from ailora_tools.training.trainer import train

# ---- the schedule (pure functions) ----------------------------------------------------------------------


def test_parts_follow_the_paper_and_give_the_remainder_to_the_top():
    assert parts(12, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert parts(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]  # ⌊10/3⌋ = 3 each; the top part takes 10 mod 3
    assert parts(4, 4) == [range(i, i + 1) for i in range(4)]
    assert parts(5, 1) == [range(0, 5)]
    with pytest.raises(TargetError, match=r"--progressive 5: the model has 4 transformer blocks"):
        parts(4, 5)
    with pytest.raises(TargetError, match=r"--progressive 0: must be at least 1"):
        parts(4, 0)


def test_steps_are_shared_out_and_each_stage_trains_fewer_blocks():
    assert stage_bounds(12, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert stage_bounds(10, 4) == [range(0, 2), range(2, 5), range(5, 7), range(7, 10)]
    assert [stage_of(s, 10, 4) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [trainable_blocks(k, 12, 3) for k in range(3)] == [range(0, 12), range(4, 12), range(8, 12)]
    with pytest.raises(TargetError, match=r"--progressive 4: training has only 3 steps"):
        stage_bounds(3, 4)


def test_updated_fraction():
    # L divisible by K, equal blocks, nothing outside them: (K + 1) / 2K
    assert updated_fraction([5] * 12, 0, 120, 2) == pytest.approx(0.75)
    assert updated_fraction([5] * 12, 0, 120, 3) == pytest.approx(2 / 3)
    assert updated_fraction([5] * 12, 0, 120, 4) == pytest.approx(0.625)
    # parameters outside the blocks train in every stage: 4 blocks of 1 + 4 outside, K = 2, N = 2
    assert updated_fraction([1, 1, 1, 1], 4, 2, 2) == pytest.approx((8 + 6) / 16)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(0, 500))
def test_schedule_properties(n_blocks, stages, extra_steps):
    if stages > n_blocks:
        with pytest.raises(TargetError):
            parts(n_blocks, stages)
        return
    total = stages + extra_steps
    ps = parts(n_blocks, stages)
    assert [b for p in ps for b in p] == list(range(n_blocks))  # every block in exactly one part, in order
    assert all(len(p) == n_blocks // stages for p in ps[:-1]) and len(ps[-1]) >= n_blocks // stages
    bounds = stage_bounds(total, stages)
    assert [s for r in bounds for s in r] == list(range(total)) and all(len(r) >= 1 for r in bounds)
    assert all(stage_of(s, total, stages) == k for k, r in enumerate(bounds) for s in r)
    starts = [trainable_blocks(k, n_blocks, stages).start for k in range(stages)]
    assert starts[0] == 0 and starts == sorted(set(starts))  # strictly fewer blocks each stage, top always trains
    fraction = updated_fraction([3] * n_blocks, 0, total, stages)
    assert 0 < fraction <= 1 and (fraction == 1) == (stages == 1)


# ---- applied to a model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("progressive")
    build_tiny_model(root / "base")  # 4 blocks
    decompose(root / "base", root / "dec", rank=4, progress=False)
    return root


def _peft(decomposed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(decomposed / "dec" / "residual", dtype=torch.float32)
    return PeftModel.from_pretrained(model, decomposed / "dec" / "adapter", is_trainable=True)


def _backward_reaches(model, stages):
    """Which blocks the backward pass runs through, and which LoRA parameters get a gradient."""
    reached = set()
    blocks = model.get_base_model().model.layers
    handles = [b.register_full_backward_hook(lambda m, gi, go, i=i: reached.add(i)) for i, b in enumerate(blocks)]
    model.get_base_model().enable_input_require_grads()  # as gradient checkpointing does: the input requires grad
    if stages is not None:
        stages.enter(4)  # step 5 of 12 in 3 stages: stage 2, blocks 1..3 train
    ids = torch.randint(4, 90, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    with_grad = {
        n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n and p.grad is not None
    }
    return reached, {int(i) for i in with_grad}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_stops_at_the_lowest_training_block(decomposed):
    plain = _backward_reaches(_peft(decomposed), None)
    assert plain == ({0, 1, 2, 3}, {0, 1, 2, 3})  # control: without stages the backward reaches block 0
    model = _peft(decomposed)
    stages = Progressive(model, stages=3, total_steps=12)
    assert _backward_reaches(model, stages) == ({1, 2, 3}, {1, 2, 3})
    frozen = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_progressive_refuses_what_does_not_fit(decomposed):
    with pytest.raises(TargetError, match=r"--progressive 5: the model has 4 transformer blocks"):
        Progressive(_peft(decomposed), stages=5, total_steps=20)
    with pytest.raises(TargetError, match=r"--progressive 3: training has only 2 steps"):
        train_dec(decomposed / "dec", data_file("demo_train.jsonl"), decomposed / "never", max_steps=2, progressive=3)
    assert not (decomposed / "never").exists()


def _block_factors(path, block):
    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if f".layers.{block}." in k}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_blocks_stay_identical_and_stages_are_reported(decomposed, tmp_path):
    out = tmp_path / "t"
    s = train_dec(
        decomposed / "dec",
        data_file("demo_train.jsonl"),
        out,
        max_steps=12,
        lr=1e-2,
        batch_size=8,
        save_every=4,
        progressive=3,
    )
    initial, at4, at8 = (
        decomposed / "dec" / "adapter",
        out / "checkpoints" / "step-0000004",
        out / "checkpoints" / "step-0000008",
    )
    # parts of 4 blocks in 3 stages: [0], [1], [2, 3]; stages run steps 1-4, 5-8, 9-12
    assert not _same(_block_factors(initial, 0), _block_factors(at4, 0))  # block 0 trained in stage 1 ...
    assert _same(_block_factors(at4, 0), _block_factors(out, 0))  # ... and not a bit changed after it
    assert not _same(_block_factors(at4, 1), _block_factors(at8, 1))
    assert _same(_block_factors(at8, 1), _block_factors(out, 1))
    assert not _same(_block_factors(at8, 3), _block_factors(out, 3))  # the top part trains to the end
    assert [st["blocks"] for st in s["progressive"]["stages"]] == [[0, 3], [1, 3], [2, 3]]
    assert [st["steps"] for st in s["progressive"]["stages"]] == [[1, 4], [5, 8], [9, 12]]
    assert all(st["tokens_per_s"] > 0 for st in s["progressive"]["stages"])
    assert s["progressive"]["updated_parameter_fraction"] == pytest.approx((4 + 3 + 2) / 12)  # equal blocks
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [1] * 4 + [2] * 4 + [3] * 4
    assert all(m["tokens"] > 0 and m["seconds"] > 0 for m in metrics)
    assert json.loads((at8 / "trainer_state.json").read_text())["stage"] == 2
    assert json.loads((out / "ailora-train.json").read_text())["progressive"] == 3


def test_stage_survives_resume(decomposed, tmp_path, monkeypatch):
    args = (decomposed / "dec" / "residual", decomposed / "dec" / "adapter", data_file("demo_train.jsonl"))
    opts = dict(max_steps=12, lr=5e-3, batch_size=8, warmup=2, save_every=3, progressive=3, progress=False)
    train(*args, tmp_path / "straight", **opts)

    with killed_at_update(monkeypatch, 7):  # killed during step 7 (stage 2); the last checkpoint is step 6
        train(*args, tmp_path / "resumed", **opts)
    with pytest.raises(OutputError, match="progressive"):  # another schedule cannot continue this run
        train(*args, tmp_path / "resumed", resume=True, **{**opts, "progressive": 2})
    train(*args, tmp_path / "resumed", resume=True, **opts)
    assert (tmp_path / "straight" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "resumed" / "adapter_model.safetensors"
    ).read_bytes()
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["stage"]) for m in metrics] == [(i + 1, i // 4 + 1) for i in range(12)]
