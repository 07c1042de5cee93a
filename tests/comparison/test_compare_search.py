"""Issue #36 on a tiny BERT classifier: `--lr auto` started from a grid whose best is at its upper edge grows it until
the best is inside, runs every seed at the chosen rate, and reports the path; an interrupted search resumed takes
the same path to the same result; `--dry-run` prints the plan and runs nothing."""

import json

import pytest
from helpers import cli, killed_at_update
from helpers.encoders import PAIR_CLASSIFIER

from ailora_tools import compare

#: 2 steps a run; eval loss chooses; the first grid 1e-7, 1e-6, 1e-5 is far below this model's best rate
AUTO = dict(
    PAIR_CLASSIFIER,
    max_steps=2,
    methods=["lora"],
    lr="auto",
    metric="loss",
    lr_center=1e-6,
    lr_factor=10.0,
    lr_max_rates=8,
    search_keep=1,
    seeds=[0, 1],
)
FLAGS = [
    *"--task sequence-classification --rank 4 --targets query,value --max-steps 2 --batch-size 8".split(),
    *"--eval-every 2 --device cpu --methods lora --lr auto --metric loss --lr-center 1e-6 --lr-factor 10".split(),
    *"--lr-max-rates 8 --search-keep 1 --seeds 0,1 --text-column sentence1 --text-pair-column sentence2".split(),
]


def _compare(encoder, data, out, *flags):
    """`compare` on bert-bare through the command line: `data`'s training file into `out`, FLAGS, then `flags`."""
    return cli("compare", encoder("bert-bare"), "--data", data[0], "-o", out, *FLAGS, *flags)


@pytest.fixture(scope="module")
def searched(encoder, data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("auto") / "cmp"
    res = _compare(encoder, data, out, "--eval-data", data[1], "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_search_grows_past_the_first_grid_until_the_best_is_inside(searched):
    out, s = searched
    path = s["searches"]["lora"]["path"]
    lrs = [p["lr"] for p in path]
    assert lrs[:3] == [1e-7, 1e-6, 1e-5] and len(lrs) > 3  # the first grid's best was at its top: it grew
    assert lrs[3:] == sorted(lrs[3:]) and all(b == pytest.approx(a * 10) for a, b in zip(lrs[2:], lrs[3:]))
    values = {p["lr"]: p["value"] for p in path if p["value"] is not None}
    best = min(values, key=values.get)
    assert min(lrs) < best < max(lrs) and s["edges"] == {"lora": None}  # inside the rates tried
    assert s["searches"]["lora"]["kept"] == [best] and s["best_lr"] == {"lora": best}
    final = [r for r in s["runs"] if r["lr"] == best]
    assert [r["seed"] for r in final] == [0, 1]  # every seed at the chosen rate, the search's seed-0 run reused
    assert len(s["runs"]) == len(lrs) + 1
    row = next(r for r in s["summary"] if r["best_lr"])
    assert row["seeds"] == [0, 1] and row["eval_loss"]["n"] + len(row["diverged"]) == 2
    report = (out / "compare.md").read_text()
    assert "## Learning-rate search (--lr auto)" in report and f"chosen {best:g}" in report
    assert "## Against lora" in report and "| lora | " in report and "Chosen rate at an edge" not in report
    manifest = json.loads((out / "compare.json").read_text())
    assert manifest["search"]["factor"] == 10 and manifest["searches"] == s["searches"]


def test_interrupted_search_resumed_takes_the_same_path(encoder, data, searched, tmp_path, capsys):  # noqa: F811
    args = (encoder("bert-bare"), data[0], tmp_path / "cmp")
    with pytest.MonkeyPatch.context() as mp, killed_at_update(mp, 7):  # the 4th run (the first beyond the grid) dies
        compare(*args, eval_data=data[1], **AUTO, progress=False)
    done = json.loads((tmp_path / "cmp" / ".ailora-progress.json").read_text())["done"]
    assert "lora-lr1e-05-seed0" in done and "lora-lr0.0001-seed0" not in done
    resumed = compare(*args, eval_data=data[1], **AUTO, resume=True, progress=True)
    err = capsys.readouterr().err
    assert "compare: 4 to 9 runs (--lr auto)" in err and "compare: the first run took" in err
    straight = searched[1]
    assert resumed["best_lr"] == straight["best_lr"] and resumed["edges"] == straight["edges"]
    for a, b in zip(resumed["searches"]["lora"]["path"], straight["searches"]["lora"]["path"], strict=True):
        assert a["lr"] == b["lr"] and (a["value"] is None) == (b["value"] is None)
        assert a["value"] == pytest.approx(b["value"], rel=1e-6) if a["value"] is not None else True
    assert [r["run"] for r in resumed["runs"]] == [r["run"] for r in straight["runs"]]


def test_a_search_with_fewer_steps_chooses_from_them_and_runs_every_seed_at_full_length(
    encoder,  # noqa: F811
    data,  # noqa: F811
    tmp_path,
    capsys,
):
    """`--search-steps 1` of a 2-step comparison: the search's runs are 1 step long and apart from the table; the
    chosen rate runs every seed (seed 0 again) at 2 steps; each length's first run is timed for the estimate."""
    s = compare(encoder("bert-bare"), data[0], tmp_path / "cmp", eval_data=data[1], **AUTO, search_steps=1)
    err = capsys.readouterr().err
    best = s["best_lr"]["lora"]
    searched = [r for r in s["runs"] if r["search_steps"] == 1]
    assert [r["lr"] for r in searched] == [p["lr"] for p in s["searches"]["lora"]["path"]]
    assert all(r["run"].endswith("-steps1") and r["steps"] == 1 for r in searched)
    final = [r for r in s["runs"] if r["search_steps"] is None]
    assert [(r["lr"], r["seed"], r["steps"]) for r in final] == [(best, 0, 2), (best, 1, 2)]
    row = next(r for r in s["summary"] if r["best_lr"])
    assert row["seeds"] == [0, 1] and [r["lr"] for r in s["summary"]] == [best]  # the table: full-length runs only
    assert "compare: the first 1-step search run took" in err and "the other 1 full-length run: about" in err
    assert "compare: the first full-length run took" in err
    tried = ", ".join(f"{lr:g}" for lr in sorted(r["lr"] for r in searched))
    report = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"lr auto (searched: {tried}; 1-step runs, the chosen rates at full length)" in report


def test_dry_run_prints_the_plan_and_runs_nothing(encoder, data, tmp_path):  # noqa: F811
    res = _compare(encoder, data, tmp_path / "cmp", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "lora: search from lr 1e-07, 1e-06, 1e-05" in res.stdout
    assert res.stdout.rstrip().endswith("4 to 9 runs; nothing run (--dry-run)")
    assert not (tmp_path / "cmp").exists()
    res = _compare(encoder, data, tmp_path / "cmp", "--baseline", "pissa", "--dry-run")
    assert res.exit_code == 1 and res.output == "error: --baseline pissa: not among the compared methods (lora)\n"


def test_a_run_stopped_by_a_non_finite_loss_is_recorded_as_diverged(encoder, data, tmp_path, monkeypatch):  # noqa: F811
    """Training raises on a NaN loss; compare records that run as diverged, leaves it out of the means, chooses
    another rate and finishes."""
    from ailora_tools.errors import NumericsError
    from ailora_tools.training import trainer

    real = trainer.train

    def train(*a, options, **k):
        if options.lr == 5e-3:
            raise NumericsError("step 1: the training loss is nan")
        return real(*a, options=options, **k)

    monkeypatch.setattr(trainer, "train", train)
    s = compare(
        encoder("bert-bare"),
        data[0],
        tmp_path / "cmp",
        eval_data=data[1],
        **dict(AUTO, lr="1e-3,5e-3", seeds=None, progress=False),
    )
    failed = next(r for r in s["runs"] if r["lr"] == 5e-3)
    assert failed["failed"] == "step 1: the training loss is nan" and failed["diverged"]
    row = next(r for r in s["summary"] if r["lr"] == 5e-3)
    assert row["diverged"] == [failed["seed"]] and row["eval_loss"] is None
    assert s["best_lr"] == {"lora": 1e-3} and s["edges"] == {"lora": "lowest"}
    assert "| lora | 0.005 |  (1 diverged) |  |" in (tmp_path / "cmp" / "compare.md").read_text()
