"""train launched by torchrun: N CPU processes (gloo) compute what one process computes, and --resume changes N."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import cli, killed_at_update, one_line_error, train_args
from helpers.processes import ONE_THREAD, torchrun
from safetensors.torch import load_file

from ailora_tools import decompose
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.options import TrainOptions, flag
from ailora_tools.training import train
from ailora_tools.training.data_parallel import Ranks
from ailora_tools.training.setup import prepare

# 7 rows per micro-batch: two ranks take 4 and 3; checkpoints at steps 2 and 4 of 6
OPTS = dict(
    max_steps=6, batch_size=7, grad_accum=2, lr=1e-2, warmup=2, save_every=2, eval_data=data_file("demo_eval.jsonl")
)

# under torchrun: the n-th optimizer update kills the run (rank 0 exits; torchrun stops the others)
KILL_AT_UPDATE = """
import os, sys, torch
n, calls, real = int(sys.argv.pop(1)), [0], torch.optim.AdamW.step
def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == n:
        os._exit(9)
    return real(self, *a, **k)
torch.optim.AdamW.step = step
from ailora_tools.cli import main
main()
"""


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    build_tiny_model(root / "base")
    decompose(root / "base", root / "dec", rank=4, progress=False)
    return root / "dec"


def args(dec, out) -> list[str]:
    return train_args(dec, data_file("demo_train.jsonl"), out, *[x for k, v in OPTS.items() for x in (flag(k), v)])


@pytest.fixture(scope="module")
def straight(decomposed, tmp_path_factory):
    """One process, uninterrupted."""
    out = tmp_path_factory.mktemp("straight") / "out"
    res = cli(*args(decomposed, out), "--quiet")
    assert res.exit_code == 0, res.output
    return out


def same_training(a, b) -> None:
    """The same adapter within 1e-5, the same steps, and losses, learning rates and tokens in metrics.jsonl."""
    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-5)
    ra, rb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, *range(1, 7), 6]
    for x, y in zip(ra, rb):
        for k in ("loss", "eval_loss", "lr", "tokens"):
            assert (k in x) == (k in y) and (k not in x or abs(x[k] - y[k]) <= 1e-5 * max(1, abs(x[k]))), (k, x, y)


def test_shares_of_the_ranks_add_up_to_the_loss_of_one_process(decomposed):
    """Rows split unevenly, padding, prompt-masked labels: Σ over ranks of share · mean loss = the batch's mean."""
    run = prepare(
        decomposed / "residual", decomposed / "adapter", data_file("demo_train.jsonl"), TrainOptions.build(max_steps=1)
    )
    batch = run.data.collate(run.data.train[:5])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padded
    weight = run.task.loss_weight(batch["labels"])
    with torch.no_grad():
        whole = run.model(**batch).loss
        for world in (2, 3, 7):
            shares = [Ranks(r, world).shard(batch, weight, run.task.loss_weight) for r in range(world)]
            assert sum(len(part["labels"]) for part, share in shares if share) == 5
            assert all(share == 0 for _, share in shares[5:])  # a rank with no rows runs one with no weight
            total = sum(run.model(**part).loss * share for part, share in shares)
            torch.testing.assert_close(total, whole, rtol=1e-6, atol=0)
    assert Ranks().shard(batch, weight, run.task.loss_weight) == (batch, 1.0)


@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_train_what_one_process_trains_and_rank_0_alone_writes(decomposed, straight, tmp_path, fsdp):
    ran = torchrun(*args(decomposed, tmp_path / "two"), "--json", *fsdp)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)  # rank 0 alone reports; rank 1 prints nothing
    assert summary["processes"] == 2 and summary["steps"] == 6
    same_training(straight, tmp_path / "two")
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(straight)  # the same checkpoints, nothing half-written or per rank
    assert cli("verify", tmp_path / "two").exit_code == 0


def test_killed_on_two_sharded_ranks_resumes_on_one(decomposed, straight, tmp_path):
    """--fsdp: the checkpoints hold the whole tensors (gathered), which one process resumes from."""
    killer = tmp_path / "kill.py"
    killer.write_text(KILL_AT_UPDATE)
    ran = subprocess.run(
        [
            sys.executable,
            *"-m torch.distributed.run --standalone --nproc-per-node=2".split(),
            str(killer),
            "6",
            *args(decomposed, tmp_path / "out"),
            "--quiet",
            "--fsdp",
        ],
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )  # the 6th update never happens
    assert ran.returncode != 0 and not (tmp_path / "out" / "ailora-train.json").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    res = cli(*args(decomposed, tmp_path / "out"), "--resume", "--quiet")  # continues from step 4 on one process
    assert res.exit_code == 0, res.output
    same_training(straight, tmp_path / "out")


@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_killed_on_one_process_resumes_on_two_ranks(decomposed, straight, tmp_path, monkeypatch, fsdp):
    with killed_at_update(monkeypatch, 4):  # after step 3: resumes from the step-2 checkpoint
        train(
            decomposed / "residual",
            decomposed / "adapter",
            data_file("demo_train.jsonl"),
            tmp_path / "out",
            **OPTS,
            progress=False,
        )
    assert not (tmp_path / "out" / "ailora-train.json").exists()
    ran = torchrun(*args(decomposed, tmp_path / "out"), "--resume", "--quiet", *fsdp)  # --fsdp: each rank its shard
    assert ran.returncode == 0, ran.stderr
    same_training(straight, tmp_path / "out")


def test_fsdp_needs_torchrun(decomposed, tmp_path):
    one_line_error(
        cli(*args(decomposed, tmp_path / "out"), "--fsdp"),
        "--fsdp shards the model across the processes",
        "torchrun --nproc-per-node N",
    )
    assert not (tmp_path / "out").exists()
