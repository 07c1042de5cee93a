"""compare sweeps on a tiny BERT classifier, every method × seed × learning rate, mean ± std over
seeds, the best rate per method chosen on eval, metric plots, and a sweep interrupted and resumed equal to an
uninterrupted one."""

import json
import random

import pytest
from helpers import cli, killed_at_update
from helpers.encoders import PAIR_CLASSIFIER, sentence
from matplotlib.image import imread

from ailora_tools import compare
from ailora_tools.comparison.sweeps import parse_lrs, parse_seeds
from ailora_tools.errors import OptionError

METHODS = ["lora", "pissa"]
#: every comparison here: 2 methods × 2 rates × 2 seeds, 4 steps each, evaluated every 2
SWEEP = dict(PAIR_CLASSIFIER, max_steps=4, methods=METHODS, lr="5e-3,2e-2", seeds=[0, 1], progress=False)
KEYS = (
    "first_loss",
    "final_loss",
    "eval_loss",
    "eval_loss_start",
    "eval",
    "best",
    "eval_start",
    "trainable_parameters",
    "steps_to_metric_target",
)


@pytest.fixture(scope="module")
def straight(encoder, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "cmp"
    return out, compare(encoder("bert-bare"), data[0], out, eval_data=data[1], **SWEEP)


def test_every_method_seed_and_rate_with_mean_std_and_best_rate(straight):
    out, s = straight
    names = [r["run"] for r in s["runs"]]
    assert names == [f"{m}-lr{lr}-seed{seed}" for m in METHODS for lr in ("0.005", "0.02") for seed in (0, 1)]
    for r in s["runs"]:
        assert set(r["eval"]) == {"accuracy", "f1", "matthews"} and r["steps"] == 4
        trained = json.loads((out / r["run"] / "trained" / "ailora-train.json").read_text())
        assert (trained["lr"], trained["seed"]) == (r["lr"], r["seed"])
        decomposed = json.loads((out / f"{r['method']}-seed{r['seed']}" / "decomposed" / "ailora.json").read_text())
        assert decomposed["options"]["seed"] == r["seed"]  # one decomposition per method and seed, shared by the rates
    manifest = json.loads((out / "compare.json").read_text())
    assert manifest["metric"] == "accuracy" and manifest["seeds"] == [0, 1]
    assert manifest["lrs"] == {"lora": [5e-3, 2e-2], "pissa": [5e-3, 2e-2]}
    for row in manifest["summary"]:  # mean ± std over the two seeds of each method and rate, less runs that diverged
        runs = [r for r in manifest["runs"] if r["run"] in row["runs"]]
        assert row["diverged"] == [r["seed"] for r in runs if r["final_loss"] > r["first_loss"]]
        accs = [r["eval"]["accuracy"] for r in runs if not r["diverged"]]
        if not accs:
            assert row["eval"] == {}
            continue
        assert row["eval"]["accuracy"]["mean"] == pytest.approx(sum(accs) / len(accs))
        assert row["eval"]["accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[-1]) / 2**0.5)
        assert row["best"]["accuracy"]["mean"] >= row["eval"]["accuracy"]["mean"] - 1e-12
        assert row["eval"]["accuracy"]["n"] == len(accs)
        assert row["seeds"] == [0, 1]
    for method in METHODS:  # the best rate: the fewest diverged seeds, then the best mean final eval accuracy
        rows = {row["lr"]: row for row in manifest["summary"] if row["method"] == method}
        best = max(
            rows,
            key=lambda lr: (
                -len(rows[lr]["diverged"]),
                rows[lr]["eval"].get("accuracy", {"mean": -1})["mean"],
                -list(rows).index(lr),
            ),
        )
        assert manifest["best_lr"][method] == best and rows[best]["best_lr"]
        assert manifest["edges"][method] == ("highest" if best == 2e-2 else "lowest")  # a 2-rate grid: always an edge
    lora, pissa = manifest["verdicts"]  # pissa against lora at their chosen rates, paired by seed
    assert lora["verdict"] == "baseline" and pissa["baseline"] == "lora"

    def pick(m):
        return {
            r["seed"]: r["selection"]
            for r in manifest["runs"]
            if r["method"] == m and r["lr"] == manifest["best_lr"][m] and not r["diverged"]
        }

    paired = [pick("pissa")[k] - pick("lora")[k] for k in sorted(set(pick("pissa")) & set(pick("lora")))]
    assert pissa["n"] == len(paired) and (not paired or pissa["mean"] == pytest.approx(sum(paired) / len(paired)))
    assert pissa["verdict"] in ("better", "worse", "no resolvable difference", "too few seeds")
    assert (pissa["verdict"] == "too few seeds") == (len(paired) < 2)
    assert lora["binomial_se"] == pytest.approx((lora["value"] * (1 - lora["value"]) / 16) ** 0.5)
    table = (out / "compare.md").read_text()
    assert (
        "| run | lr | trainable params |" in table
        and "final accuracy | best accuracy | steps to accuracy target" in table
    )
    assert "## Learning rates: final eval accuracy" in table and " ± " in table
    assert "**Chosen rate at an edge of the rates tried**" in table and "widen --lr or use --lr auto" in table
    assert manifest["plots"] == ["train_loss.png", "eval_loss.png", "eval_accuracy.png"]
    img = imread(out / "eval_accuracy.png")
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.05


def test_interrupted_sweep_resumed_equals_uninterrupted(encoder, data, straight, tmp_path):
    out = tmp_path / "cmp"
    args = (encoder("bert-bare"), data[0], out)
    opts = dict(SWEEP, eval_data=data[1], save_every=2)
    with pytest.MonkeyPatch.context() as mp, killed_at_update(mp, 15):  # the 4th run dies at its 3rd step
        compare(*args, **opts)
    done = json.loads((out / ".ailora-progress.json").read_text())["done"]
    assert "lora-lr0.005-seed0" in done and "lora-lr0.02-seed1" not in done
    resumed = compare(*args, **opts, resume=True)
    reference = {r["run"]: r for r in straight[1]["runs"]}
    assert [r["run"] for r in resumed["runs"]] == list(reference)
    for r in resumed["runs"]:
        for key in KEYS:
            assert r[key] == pytest.approx(reference[r["run"]][key], rel=1e-6), (r["run"], key)
    assert resumed["best_lr"] == straight[1]["best_lr"]
    for a, b in zip(resumed["summary"], straight[1]["summary"], strict=True):
        assert (a["run"], a["lr"], a["best_lr"], a["seeds"]) == (b["run"], b["lr"], b["best_lr"], b["seeds"])
        for name in ("accuracy", "f1", "matthews"):
            for stat in ("mean", "std"):
                assert a["eval"][name][stat] == pytest.approx(b["eval"][name][stat], rel=1e-6, abs=1e-9)
                assert a["best"][name][stat] == pytest.approx(b["best"][name][stat], rel=1e-6, abs=1e-9)
    table = lambda out: [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]  # noqa: E731
    strip = lambda rows: [row.rsplit("|", 3)[0] for row in rows]  # noqa: E731  (all but the times)
    assert strip(table(out)) == strip(table(straight[0]))


def test_regression_compare_reports_pearson_with_per_method_rates(encoder, tmp_path):
    rng = random.Random(3)
    rows = ["text,score"] + [f"{sentence(rng, a)},{float(a) * 5:.1f}" for a in (rng.random() < 0.5 for _ in range(24))]
    (tmp_path / "stsb.csv").write_text("\n".join(rows) + "\n")
    res = cli(
        "compare",
        encoder("bert-bare"),
        "--data",
        tmp_path / "stsb.csv",
        "--eval-data",
        tmp_path / "stsb.csv",
        "-o",
        tmp_path / "cmp",
        *"--task sequence-classification --num-labels 1 --label-column score --methods lora,ailora --lr".split(),
        *"ailora=1e-3,lora=1e-2 --rank 4 --targets query,value --max-steps 2 --batch-size 8 --eval-every".split(),
        *"2 --device cpu --warmup-ratio 0.5 --weight-decay 0.1 --json".split(),
    )
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert [(r["run"], r["lr"]) for r in s["runs"]] == [("lora", 1e-2), ("ailora", 1e-3)]
    assert all(set(r["eval"]) == {"pearson", "spearman"} for r in s["runs"])
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metric"] == "pearson"
    assert "eval_pearson.png" in s["plots"] and "final pearson" in (tmp_path / "cmp" / "compare.md").read_text()


def test_rates_and_seeds_parse_and_fail_in_one_line(encoder, data, tmp_path):
    methods = ["lora", "pissa", "ailora"]
    assert parse_lrs(None, methods, 2e-4) == {m: [2e-4] for m in methods}
    assert parse_lrs("1e-4,5e-4", methods, 2e-4) == {m: [1e-4, 5e-4] for m in methods}
    assert parse_lrs("pissa=1e-4,lora=5e-4,lora=1e-3", methods, 2e-4) == {
        "lora": [5e-4, 1e-3],
        "pissa": [1e-4],
        "ailora": [2e-4],
    }
    assert parse_lrs({"pissa": [1e-4, 2e-4]}, methods, 3e-4)["pissa"] == [1e-4, 2e-4]
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None) is None
    for bad, message in (
        ("dora=1e-4", "--lr dora=1e-4: dora is not among the compared methods"),
        ("fast", "--lr fast: 'fast' is not a number"),
        ("0", "--lr 0: rate 0 must be a finite number greater than 0"),
    ):
        with pytest.raises(OptionError, match=message):
            parse_lrs(bad, methods, 2e-4)
    with pytest.raises(OptionError, match="--seeds 0,0: give integers, each once"):
        parse_seeds("0,0")
    for out, model, settings, message in (
        (
            "a",
            "llama",
            dict(methods=["lora-da"], text_column="sentence1"),
            "--methods lora-da: LoRA-DA does not calibrate a llama model for --task sequence-classification",
        ),
        (
            "b",
            "bert-bare",
            dict(methods=["lora"], metric="pearson"),
            "--metric pearson: not reported for --task sequence-classification",
        ),
    ):
        with pytest.raises(OptionError, match=message):
            compare(encoder(model), data[0], tmp_path / out, task="sequence-classification", **settings)
    res = cli(
        "compare",
        encoder("bert-bare"),
        "--data",
        data[0],
        "-o",
        tmp_path / "c",
        *"--task sequence-classification --methods lora --label-column gold".split(),
    )
    assert res.exit_code == 1 and res.output == (
        f"error: --data {data[0]}: no column 'gold' (--label-column); its "
        "columns are 'sentence1', 'sentence2', 'label'\n"
    )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_lora_da_row_on_a_bert_classifier(encoder, data, tmp_path):
    """LoRA-DA calibrates the encoder on the training data through the classification head, for train's task and
    columns; its row sits in the table beside plain LoRA's."""
    s = compare(
        encoder("bert-bare"),
        data[0],
        tmp_path / "cmp",
        eval_data=data[1],
        **dict(SWEEP, methods=["lora", "lora-da"], lr=2e-2, seeds=None, max_steps=2),
    )
    assert [r["run"] for r in s["runs"]] == ["lora", "lora-da"]
    decomposed = json.loads((tmp_path / "cmp" / "lora-da" / "decomposed" / "ailora.json").read_text())
    assert decomposed["method"] == "lora-da" and decomposed["data"]["task"] == "sequence-classification"
    assert decomposed["options"]["text_pair_column"] == "sentence2" and decomposed["data"]["samples"] == 32
    assert all(m["gradient_norm"] > 0 for m in decomposed["modules"].values())
    assert "| lora-da | 0.02 |" in (tmp_path / "cmp" / "compare.md").read_text()
