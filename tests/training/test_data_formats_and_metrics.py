"""Evaluation metrics against scikit-learn / SciPy on known predictions; data files as CSV, TSV,
JSONL, Parquet and `datasets` directories with named columns, pairs and regression labels; one-line errors."""

import csv
import json
import random
from types import SimpleNamespace

import pytest
import torch
from helpers import train_args
from helpers.encoders import FILLER, cli, decompose, sentence
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ailora_tools.cli import main
from ailora_tools.errors import (
    FormatError,
    InputNotFoundError,
    OptionError,
    UnsupportedError,
)
from ailora_tools.io.examples import Columns, check_rows, collate_labeled
from ailora_tools.io.labels import read_labeled
from ailora_tools.options import TrainOptions
from ailora_tools.training.metrics import classification_metrics, regression_metrics
from ailora_tools.training.tasks import TASKS, evaluate

LABELS = [0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
PREDS = [0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
TARGETS = [0.1, 2.5, 3.9, 1.2, 4.8, 0.0, 2.2, 3.3]
GUESSES = [0.3, 2.0, 3.5, 1.9, 4.1, 0.8, 2.9, 2.7]


def test_classification_metrics_are_scikit_learns():
    got = classification_metrics(PREDS, LABELS, 2)
    assert got == {
        "accuracy": accuracy_score(LABELS, PREDS),
        "f1": f1_score(LABELS, PREDS),
        "matthews": matthews_corrcoef(LABELS, PREDS),
    }
    labels3, preds3 = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 2, 1, 1, 0]
    got = classification_metrics(preds3, labels3, 3)  # more classes: macro F1
    assert got["f1"] == f1_score(labels3, preds3, average="macro")
    assert got["matthews"] == matthews_corrcoef(labels3, preds3)
    assert classification_metrics([1, 1, 1], [0, 1, 0], 2)["matthews"] == 0.0  # constant predictions: defined


def test_regression_metrics_are_scipys():
    got = regression_metrics(GUESSES, TARGETS)
    assert got == {"pearson": pearsonr(GUESSES, TARGETS)[0], "spearman": spearmanr(GUESSES, TARGETS)[0]}
    assert regression_metrics([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == {"pearson": None, "spearman": None}


class Fixed(torch.nn.Module):
    """A model whose logits are read from the input: token 1 holds the prediction (classification: a class id;
    regression: the value × 10). Evaluation must report the library's metrics of exactly these predictions."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None):
        if self.width == 1:
            logits = (input_ids[:, 1].float() / 10)[:, None]
            loss = torch.nn.functional.mse_loss(logits[:, 0], labels)
        else:
            logits = torch.nn.functional.one_hot(input_ids[:, 1], self.width).float()
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


@pytest.mark.parametrize("regression", [False, True])
def test_evaluation_reports_the_librarys_metrics_of_the_models_predictions(regression):
    from ailora_tools.io.labels import LabeledExample

    if regression:
        examples = [LabeledExample([5, round(g * 10), 6], None, t) for g, t in zip(GUESSES, TARGETS)]
        want = {
            "eval_pearson": pearsonr([round(g * 10) / 10 for g in GUESSES], TARGETS)[0],
            "eval_spearman": spearmanr(GUESSES, TARGETS)[0],
        }
    else:
        examples = [LabeledExample([5, p, 6], None, y) for p, y in zip(PREDS, LABELS)]
        want = {
            "eval_accuracy": accuracy_score(LABELS, PREDS),
            "eval_f1": f1_score(LABELS, PREDS),
            "eval_matthews": matthews_corrcoef(LABELS, PREDS),
        }
    got = evaluate(
        Fixed(1 if regression else 2),
        TASKS["sequence-classification"],
        examples,
        lambda b: collate_labeled(b, 0),
        batch_size=5,
        device=torch.device("cpu"),
        autocast=False,
    )
    assert set(got) == {"eval_loss", *want}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


ROWS = [
    {"sentence1": f"the movie {w}", "sentence2": f"a plot {v}", "label": lab}
    for w, v, lab in [
        ("good", "nice", "same"),
        ("bad", "nice", "different"),
        ("awful", "poor", "same"),
        ('"great", he said', "fine", "different"),
    ]
]


def write_all(tmp_path, rows: list[dict]) -> dict[str, object]:
    """The same rows as JSONL, CSV, TSV, Parquet and a `datasets` directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # as GLUE writes its TSVs: cells as they are, quotes included
    paths["tsv"].write_text(
        "".join("\t".join(map(str, r)) + "\n" for r in [list(rows[0]), *[r.values() for r in rows]])
    )
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    import datasets  # the test extra installs it (for users it is the optional [datasets] extra)

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    paths["datasets"] = tmp_path / "ds"
    return paths


def test_every_format_reads_the_same_pairs_with_named_columns(tmp_path):
    paths = write_all(tmp_path, ROWS)
    cols = Columns(text="sentence1", pair="sentence2")
    want = [(r["sentence1"], r["sentence2"], r["label"]) for r in ROWS]
    for kind, path in paths.items():
        got = read_labeled(path, columns=cols)
        assert [(r.text_a, r.text_b, r.label) for r in got] == want, kind
    assert [r.line for r in read_labeled(paths["csv"], columns=cols)] == [2, 3, 4, 5]  # the header is line 1
    assert [r.line for r in read_labeled(paths["parquet"], columns=cols)] == [1, 2, 3, 4]  # rows


def test_integer_labels_in_text_tables_are_class_ids_and_regression_labels_are_floats(tmp_path):
    rows = [{"text": "a", "label": 1, "score": 0.5}, {"text": "b", "label": 0, "score": 4.25}]
    paths = write_all(tmp_path, rows)
    for kind, path in paths.items():
        assert [r.label for r in read_labeled(path)] == [1, 0], kind
        got = read_labeled(path, columns=Columns(label="score"), regression=True)
        assert [r.label for r in got] == [0.5, 4.25] and all(isinstance(r.label, float) for r in got), kind


def test_language_model_rows_from_a_table_with_a_text_column(tmp_path):
    paths = write_all(tmp_path, [{"body": "the movie was good", "id": 1}, {"body": "a bad plot", "id": 2}])
    for kind, path in paths.items():
        assert check_rows(path, task="masked-lm", columns=Columns(text="body")) == 2, kind
        assert check_rows(path, task="causal-lm", columns=Columns(text="body")) == 2, kind


@pytest.mark.parametrize(
    "rows,columns,regression,message",
    [
        (
            ROWS,
            Columns(text="sentence"),
            False,
            r"d\.csv: no column 'sentence' \(--text-column\); its columns are 'sentence1', 'sentence2', 'label'",
        ),
        (ROWS, Columns(text="sentence1", label="gold"), False, r"no column 'gold' \(--label-column\)"),
        (ROWS, Columns(), False, r"d\.csv: no \"text\" or \"text_a\" column; name the text column with --text-column"),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "0.3"}],
            Columns(),
            True,
            r'd\.csv:2: "label" is "x"; regression \(--num-labels 1\) needs numbers',
        ),
        (
            [{"text": "a", "label": "-1"}, {"text": "b", "label": "0"}],
            Columns(),
            False,
            r'd\.csv:2: "label" is -1; class ids are 0\.\.K-1',
        ),
    ],
)
def test_bad_column_or_label_is_one_clear_error(tmp_path, rows, columns, regression, message):
    path = write_all(tmp_path, rows)["csv"]
    with pytest.raises(FormatError, match=message):
        read_labeled(path, columns=columns, regression=regression)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(InputNotFoundError, match=r"--data .*none\.csv: no such data file"):
        read_labeled(tmp_path / "none.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UnsupportedError, match=r"unknown data format '\.xlsx'; use \.jsonl, \.csv, \.tsv, \.parquet"):
        read_labeled(tmp_path / "d.xlsx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedError, match="not a `datasets` save_to_disk directory"):
        read_labeled(tmp_path / "empty")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0.5}\n')
    with pytest.raises(
        FormatError, match=r'd\.jsonl:1: "label" is 0\.5, not a class id .*use --num-labels 1 for regression'
    ):
        read_labeled(tmp_path / "d.jsonl")
    with pytest.raises(OptionError, match="^warmup_ratio 0.06 and warmup 10: give one of the two"):
        TrainOptions(warmup_ratio=0.06, warmup=10)


def test_train_on_csv_pairs_stores_label_names_and_parquet_regression(encoder, tmp_path):
    """train reads a CSV of named pair columns with named labels (id2label in the head's config) and a Parquet
    regression file (--num-labels 1: problem_type regression, Pearson/Spearman at each evaluation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dec = decompose(encoder("bert-bare"), tmp_path / "dec")
    rng = random.Random(0)
    rows = [
        {
            "s1": sentence(rng, a),
            "s2": rng.choice(FILLER),
            "gold": ["negative", "positive"][a],
            "score": float(a) * 4 + rng.random(),
        }
        for a in (rng.random() < 0.5 for _ in range(24))
    ]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    common = [
        "--base",
        dec / "residual",
        "--adapter",
        dec / "adapter",
        *"--task sequence-classification --text-column s1 --text-pair-column s2 --max-steps 3 --batch-size 8".split(),
        *"--eval-every 3 --lr 1e-2 --json --quiet".split(),
    ]
    s = cli(
        "train",
        *common,
        "--data",
        tmp_path / "t.csv",
        "--eval-data",
        tmp_path / "t.csv",
        "--label-column",
        "gold",
        "-o",
        tmp_path / "cls",
        *"--warmup-ratio 0.5 --weight-decay 0.1".split(),
    )
    assert {"eval_accuracy", "eval_f1", "eval_matthews"} <= set(s)
    manifest = json.loads((tmp_path / "cls" / "ailora-train.json").read_text())
    assert manifest["labels"]["id2label"] == {"0": "negative", "1": "positive"}
    assert manifest["task"]["config"]["label2id"] == {"negative": 0, "positive": 1}
    assert (manifest["warmup"], manifest["weight_decay"]) == (2, 0.1)  # ceil(0.5 × 3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    s = cli(
        "train",
        *common,
        "--data",
        tmp_path / "t.parquet",
        "--eval-data",
        tmp_path / "t.parquet",
        *"--label-column score --num-labels 1 -o".split(),
        tmp_path / "reg",
    )
    assert {"eval_pearson", "eval_spearman"} <= set(s) and "eval_accuracy" not in s
    manifest = json.loads((tmp_path / "reg" / "ailora-train.json").read_text())
    assert manifest["labels"]["problem_type"] == "regression" and manifest["labels"]["num_labels"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "reg" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_pearson" in m] == [0, 3, 3]  # start, every 3, final


def test_a_bad_column_fails_before_any_model_loads(encoder, tmp_path):
    from click.testing import CliRunner

    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\n")
    dec = decompose(encoder("bert-bare"), tmp_path / "dec")
    res = CliRunner().invoke(
        main,
        [
            *train_args(dec, tmp_path / "t.tsv", tmp_path / "o"),
            *"--task sequence-classification --text-column text".split(),
        ],
    )
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: --data {tmp_path / 't.tsv'}: no column 'text' (--text-column); its columns are 'sentence', 'label'"
    ]
    assert not (tmp_path / "o").exists()


def test_weight_decay_spares_biases_and_layer_norms_as_transformers_trainer_does():
    from ailora_tools.training.setup import decay_groups

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model.add_module("frozen", torch.nn.Linear(2, 2).requires_grad_(False))
    assert decay_groups(model, 0.0) == [model[0].weight, model[0].bias, model[1].weight, model[1].bias]
    groups = decay_groups(model, 0.1)  # LayerNorms found by their type, as the Trainer finds them
    assert [(g["params"], g["weight_decay"]) for g in groups] == [
        ([model[0].weight], 0.1),
        ([model[0].bias, model[1].weight, model[1].bias], 0.0),
    ]
