"""`compare`: one decompose + train per method with the same settings, the table, the plots, resume."""

import json

import pytest
from click.testing import CliRunner
from helpers import killed_at_update
from matplotlib.image import imread

from ailora_tools import compare
from ailora_tools.cli import main
from ailora_tools.comparison.curves import steps_to_reach, trailing_mean
from ailora_tools.decomposition import pipeline as decomposition
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import FormatError, OptionError, OutputError, TargetError
from ailora_tools.training import trainer as train_module
from ailora_tools.verify import verify

RANK = 4
#: the settings every comparison here shares (a few steps on the demo model)
OPTS = dict(rank=RANK, max_steps=6, lr=1e-2, batch_size=8, eval_every=3, seed=1, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    build_tiny_model(root / "base")
    lines = data_file("demo_eval.jsonl").read_text().splitlines()
    (root / "eval.jsonl").write_text("\n".join(lines[:16]) + "\n")
    return root


def brief(setup, out, methods: list[str], **extra) -> dict:
    """`compare` of `methods` on the demo model and data, 2 steps each."""
    return compare(
        setup / "base",
        data_file("demo_train.jsonl"),
        out,
        methods=methods,
        progress=False,
        **OPTS | {"max_steps": 2},
        **extra,
    )


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted comparison of lora and ailora, through the CLI."""
    out = setup / "straight"
    res = CliRunner().invoke(
        main,
        [
            "compare",
            str(setup / "base"),
            "--data",
            str(data_file("demo_train.jsonl")),
            "--eval-data",
            str(setup / "eval.jsonl"),
            "-o",
            str(out),
            "--methods",
            "lora,ailora",
            "--rank",
            str(RANK),
            *"--max-steps 6 --lr 1e-2 --batch-size 8 --eval-every 3 --seed 1 --device cpu --smooth 2 --json".split(),
        ],
    )
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


@pytest.mark.slow
def test_table_json_and_plots(straight):
    out, summary = straight
    manifest = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in manifest["runs"]] == ["lora", "ailora"] == [r["run"] for r in summary["runs"]]
    trainable = 4 * (RANK * (128 + 128) + RANK * (128 + 64))  # 4 layers: q_proj 128x128, v_proj 64x128
    for r in manifest["runs"]:
        run = out / r["run"]
        assert (run / "decomposed" / "ailora.json").is_file() and (run / "trained" / "ailora-train.json").is_file()
        assert (run / "decomposed" / "residual").is_dir() == (r["method"] != "lora")
        metrics = [json.loads(line) for line in (run / "trained" / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) == 6 and r["first_loss"] == losses[0] and r["steps"] == 6
        assert r["final_loss"] == pytest.approx((losses[-1] + losses[-2]) / 2)  # --smooth 2
        evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
        assert sorted(evals) == [0, 3, 6] and r["eval_loss"] == evals[6] and r["eval_loss_start"] == evals[0]
        assert r["trainable_parameters"] == trainable and r["progressive"] is None
        trained = json.loads((run / "trained" / "ailora-train.json").read_text())
        assert trained["steps"] == 6 and trained["seed"] == 1 and trained["lr"] == 1e-2
    lora, ailora = manifest["runs"]
    assert lora["first_loss"] == pytest.approx(ailora["first_loss"], abs=1e-5)  # both start from the same model
    assert lora["eval_loss"] != ailora["eval_loss"]
    goal = manifest["targets_loss"]
    assert goal["train"] == max(lora["final_loss"], ailora["final_loss"]) and not goal["given"]
    for r in manifest["runs"]:  # the worst run reaches the automatic target at its last step at the latest
        assert r["steps_to_train_target"] is not None and 1 <= r["steps_to_train_target"] <= 6
        assert r["steps_to_eval_target"] in (3, 6)
    table = (out / "compare.md").read_text()
    main_table, against = table.split("## Against lora")
    rows = [line for line in main_table.splitlines() if line.startswith(("| lora ", "| ailora "))]
    assert "| ailora | 0.01 | " in against and "| too few seeds |" in against  # one seed: no verdict possible
    assert len(rows) == 2 and f"{trainable:,}" in rows[0] and f"{ailora['eval_loss']:.4f}" in rows[1]
    assert "![train loss](train_loss.png)" in table and "![eval loss](eval_loss.png)" in table
    for name in ("train_loss.png", "eval_loss.png"):
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and float(img[..., :3].std()) > 0.05
    assert set(manifest["files"]["output"]) == {"compare.md", "train_loss.png", "eval_loss.png"}
    report = verify(out)  # the comparison's own files and every run's decompose and train outputs below it
    assert report["problems"] == [] and report["files_checked"] > 3
    assert "4 outputs below" in report["manifest"] and "ailora/trained" in report["manifest"]


@pytest.mark.slow
def test_interrupted_comparison_resumes_without_redoing_finished_runs(setup, straight, tmp_path, monkeypatch):
    args = (setup / "base", data_file("demo_train.jsonl"), tmp_path / "c")
    opts = dict(
        OPTS, eval_data=setup / "eval.jsonl", methods=["lora", "ailora"], smooth=2, save_every=3, progress=False
    )
    with killed_at_update(monkeypatch, 11):  # lora takes steps 1-6; ailora dies at its 5th, after its checkpoint at 3
        compare(*args, **opts)
    lora_adapter = tmp_path / "c" / "lora" / "trained" / "adapter_model.safetensors"
    before = lora_adapter.stat().st_mtime_ns
    calls = []
    for module, name in ((decomposition, "decompose"), (train_module, "train")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, str(a[-1]))) or _real(*a, **k)
        )
    with pytest.raises(OutputError, match="exists and is not empty; pass --resume"):
        compare(*args, **opts)
    summary = compare(*args, **opts, resume=True)
    assert calls == [("train", str(tmp_path / "c" / "ailora" / "trained"))]  # lora and ailora's decompose kept
    assert lora_adapter.stat().st_mtime_ns == before
    metrics = [
        json.loads(line) for line in (tmp_path / "c" / "ailora" / "trained" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    reference = {r["run"]: r for r in straight[1]["runs"]}
    for r in summary["runs"]:  # exactly what the uninterrupted comparison got (save_every does not change training)
        for key in ("first_loss", "final_loss", "eval_loss", "eval_loss_start", "trainable_parameters"):
            assert r[key] == pytest.approx(reference[r["run"]][key], rel=1e-6), (r["run"], key)


@pytest.mark.slow
def test_progressive_runs_both_variants_and_lora_da_calibrates(setup, tmp_path):
    s = brief(setup, tmp_path / "p", ["ailora", "lora-da"], progressive=2)
    runs = [(r["run"], r["progressive"]) for r in s["runs"]]
    assert runs == [("ailora", None), ("lora-da", None), ("ailora-progressive2", 2), ("lora-da-progressive2", 2)]
    trained = json.loads((tmp_path / "p" / "ailora-progressive2" / "trained" / "ailora-train.json").read_text())
    assert trained["progressive"] == 2 and len(trained["summary"]["progressive"]["stages"]) == 2
    decomposed = json.loads((tmp_path / "p" / "lora-da" / "decomposed" / "ailora.json").read_text())
    assert decomposed["method"] == "lora-da" and decomposed["data"]["samples"] == 64
    assert "| lora-da-progressive2 |" in (tmp_path / "p" / "compare.md").read_text()
    assert s["plots"] == ["train_loss.png"]  # no eval data, no eval plot


def test_bad_input_fails_before_any_run(tiny, setup, tmp_path):
    data = data_file("demo_train.jsonl")
    with pytest.raises(OptionError, match="--methods lora,vera: give each once, from ailora, pissa, milora, lora"):
        compare(setup / "base", data, tmp_path / "a", methods=["lora", "vera"])
    with pytest.raises(OptionError, match="METHOD\\+dora"):
        compare(setup / "base", data, tmp_path / "a", methods=["pissa+lora"])
    with pytest.raises(TargetError, match="part of the fused c_attn"):  # q_proj on GPT-2, found before lora trains
        compare(tiny("gpt2"), data, tmp_path / "b", methods=["lora", "ailora"])
    with pytest.raises(FormatError, match="sample 1 has .* tokens, more than --max-length 4"):  # before lora's run
        compare(setup / "base", data, tmp_path / "b", methods=["lora", "lora-da"], max_length=4)
    res = CliRunner().invoke(
        main, ["compare", str(setup / "base"), "--data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "c")]
    )
    assert res.exit_code == 1 and res.output == f"error: --data {tmp_path / 'none.jsonl'}: no such data file\n"
    assert not any((tmp_path / d).exists() for d in "abc")


def test_smoothing_and_steps_to_reach():
    curve = [(1, 4.0), (2, 2.0), (3, 3.0), (4, 1.0)]
    assert trailing_mean(curve, 2) == [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)]
    assert steps_to_reach(trailing_mean(curve, 2), 2.5) == 3 and steps_to_reach(curve, 0.5) is None


@pytest.mark.slow
def test_dora_rows_decompose_with_dora(setup, tmp_path):
    """ "dora" is plain DoRA and "pissa+dora" PiSSA's init with DoRA's magnitudes: both train as DoRA adapters."""
    s = brief(setup, tmp_path / "d", ["dora", "pissa+dora"])
    assert [r["run"] for r in s["runs"]] == ["dora", "pissa+dora"]
    for run, method in (("dora", "lora"), ("pissa+dora", "pissa")):
        decomposed = json.loads((tmp_path / "d" / run / "decomposed" / "ailora.json").read_text())
        assert decomposed["method"] == method and decomposed["dora"] is True
        config = json.loads((tmp_path / "d" / run / "trained" / "adapter_config.json").read_text())
        assert config["use_dora"] is True
