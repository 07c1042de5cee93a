"""`train`, the demo and the recipes: what a training run writes, resumes and reports."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import killed_at_update

from ailora_tools import decompose
from ailora_tools.cli import main
from ailora_tools.config import load_recipe
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import FormatError
from ailora_tools.io.examples import IGNORE, load_jsonl
from ailora_tools.training.trainer import train

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_tiny_model(root / "base")
    decompose(root / "base", root / "dec", rank=4, progress=False)
    return root


def tokenizer(root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "base")


def test_training_lowers_loss_and_leaves_residual_untouched(decomposed, tmp_path):
    res = decomposed / "dec" / "residual"
    before = {p.name: p.read_bytes() for p in res.iterdir()}
    s = train(
        res,
        decomposed / "dec" / "adapter",
        data_file("demo_train.jsonl"),
        tmp_path / "t",
        eval_data=data_file("demo_eval.jsonl"),
        max_steps=40,
        lr=1e-2,
        batch_size=16,
        progress=False,
    )
    assert s["eval_loss"] < 0.9 * s["eval_loss_start"]
    assert {p.name: p.read_bytes() for p in res.iterdir()} == before
    metrics = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 41))
    assert all("lr" in m for m in metrics if "loss" in m)
    manifest = json.loads((tmp_path / "t" / "ailora-train.json").read_text())
    assert manifest["initial_adapter"] == str((decomposed / "dec" / "adapter").absolute())
    assert not list((tmp_path / "t").rglob("*.pt")) and not list((tmp_path / "t").rglob("*.bin"))


def test_completion_only_masking(decomposed, tmp_path):
    tok = tokenizer(decomposed)
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"prompt": "Q: 1 + 1 = ?\nA:", "completion": " 2"})
        + "\n"
        + json.dumps({"text": "hello"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
    )
    pc, text, chat = load_jsonl(f, tok, max_length=64)
    n_prompt = len(tok("Q: 1 + 1 = ?\nA:", add_special_tokens=False)["input_ids"])
    assert pc.labels[:n_prompt] == [IGNORE] * n_prompt
    assert pc.labels[n_prompt:] == pc.input_ids[n_prompt:] and len(pc.labels) == n_prompt + 3  # " 2" + eos
    assert text.labels == text.input_ids
    learned = tok.decode([i for i, lab in zip(chat.input_ids, chat.labels) if lab != IGNORE])
    assert learned == "yo</s>"


@pytest.mark.parametrize(
    "line,why",
    [
        ('{"prompt": "x"', "line 2"),
        ('{"foo": 1}', 'expected "text"'),
        ('{"prompt": 3, "completion": "a"}', '"prompt" must be a string'),
    ],
)
def test_bad_data_line_names_its_number(decomposed, tmp_path, line, why):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(FormatError, match=rf"d.jsonl:2: .*{why}" if why != "line 2" else r"d.jsonl:2: "):
        load_jsonl(f, tokenizer(decomposed), max_length=64)


def test_resume_continues_as_if_uninterrupted(decomposed, tmp_path, monkeypatch):
    args = (decomposed / "dec" / "residual", decomposed / "dec" / "adapter", data_file("demo_train.jsonl"))
    opts = dict(
        max_steps=12,
        lr=5e-3,
        batch_size=8,
        grad_accum=2,
        warmup=3,
        save_every=5,
        progress=False,
        eval_data=data_file("demo_eval.jsonl"),
    )
    straight = train(*args, tmp_path / "straight", **opts)

    with killed_at_update(monkeypatch, 7):  # the 7th update never happens: as if killed after step 6
        train(*args, tmp_path / "resumed", **opts)
    assert not (tmp_path / "resumed" / "ailora-train.json").exists()
    resumed = train(*args, tmp_path / "resumed", resume=True, **opts)  # restarts from the step-5 checkpoint
    assert resumed["eval_loss_start"] == straight["eval_loss_start"]  # the first run's, not step 5's
    assert resumed["eval_loss"] == straight["eval_loss"] < straight["eval_loss_start"]
    a = (tmp_path / "straight" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes()
    assert a == b
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, *range(1, 13), 12]  # the start's evaluation, each step, the final evaluation


def test_demo_through_the_cli(tmp_path):
    res = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--steps", "60", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "all checks passed" in res.output and "FAILED" not in res.output
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["step"] for r in report["steps"]] == [
        "build tiny model",
        "decompose (ailora, r=8)",
        "train",
        "convert",
        "merge",
        "parity check",
    ]
    assert all(r["ok"] for r in report["steps"])
    assert report["train"]["eval_loss"] < report["train"]["eval_loss_start"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse(recipe):
    assert len(RECIPES) >= 4
    table = load_recipe(recipe, "decompose")
    assert table["method"] == "ailora" and table["rank"] > 0 and "model" in table
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ailora-tools decompose --config recipes/" + recipe.name)
    if "[train]" in recipe.read_text():
        assert load_recipe(recipe, "train")["lr"] > 0


def test_decompose_config_uses_recipe_settings(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    text = (Path(__file__).parents[2] / "recipes" / "llama-3.1-8b.toml").read_text()
    recipe.write_text(
        text.replace('model = "meta-llama/Llama-3.1-8B"', f'model = "{tiny("llama")}"').replace(
            "rank = 16\nalpha = 16", "rank = 4\nalpha = 12"
        )
    )
    res = CliRunner().invoke(main, ["decompose", "--config", str(recipe), "-o", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "ailora.json").read_text())
    assert (m["method"], m["rank"], m["alpha"], m["svd"]["niter"]) == ("ailora", 4, 12.0, 4)
    res = CliRunner().invoke(
        main, ["decompose", "--config", str(recipe), "-o", str(tmp_path / "o2"), "--rank", "2", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "ailora.json").read_text())["rank"] == 2  # the flag wins


def test_resume_before_the_first_checkpoint_writes_each_step_once(decomposed, tmp_path, monkeypatch):
    """Killed before any checkpoint, a resumed run starts again at step 0: metrics.jsonl then holds each record once,
    as an uninterrupted run's does."""
    args = (decomposed / "dec" / "residual", decomposed / "dec" / "adapter", data_file("demo_train.jsonl"))
    opts = dict(eval_data=data_file("demo_eval.jsonl"), max_steps=6, save_every=100, batch_size=8, progress=False)
    with killed_at_update(monkeypatch, 4):
        train(*args, tmp_path / "t", **opts)
    train(*args, tmp_path / "t", **opts, resume=True)
    train(*args, tmp_path / "straight", **opts)
    steps = [
        [r["step"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
        for d in ("t", "straight")
    ]
    assert steps[0] == steps[1] == [0, 1, 2, 3, 4, 5, 6, 6]


def test_gradient_checkpointing_trains_the_same(decomposed, tmp_path):
    """Recomputing the blocks' activations in the backward pass (non-reentrant) changes no gradient."""
    from safetensors.torch import load_file

    from ailora_tools.options import TrainOptions
    from ailora_tools.training.setup import prepare

    args = (decomposed / "dec" / "residual", decomposed / "dec" / "adapter", data_file("demo_train.jsonl"))
    run = prepare(*args, TrainOptions.build(gradient_checkpointing=True))
    calls = []
    run.model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    run.model.train()
    run.model(**run.data.collate(run.data.train[:4])).loss.backward()
    assert len(calls) == 2  # the block's modules ran again in the backward pass
    opts = dict(max_steps=4, lr=1e-2, batch_size=8, progress=False)
    plain = train(*args, tmp_path / "plain", **opts)
    checkpointed = train(*args, tmp_path / "gc", **opts, gradient_checkpointing=True)
    assert checkpointed["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-6)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "gc"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
