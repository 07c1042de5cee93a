"""Sequence-classification labels as every data format writes them (an empty label,
numbers, a label only the evaluation file has) and TSVs quoted as Python's csv module and pandas write them."""

import csv
import json

import pytest
from helpers import cli, one_line_error

from ailora_tools.errors import FormatError
from ailora_tools.io.examples import Columns, check_data
from ailora_tools.io.labels import label_ids, read_labeled
from ailora_tools.io.tables import rows as table_rows

#: real-looking review text: a cell with a newline, one with a tab and one with quotes
REVIEWS = [
    ("Loved it.\nThe second half drags, but the ending pays off.", "positive"),
    ('The "director\'s cut"\tadds nothing; skip it.', "negative"),
    ('She said "wow" twice. So did I.', "positive"),
    ("Flat, dull, and far too long.", "negative"),
]


def write(path, rows: list[dict]):
    """`rows` in the format of `path`'s suffix (a directory: a `datasets` save_to_disk); None is a null (JSONL,
    Parquet, datasets) or an empty cell (CSV, TSV); a row without the "label" key lacks it (JSONL)."""
    kind = path.suffix or "datasets"
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if kind == ".csv" else "\t")
            w.writerow(list(rows[0]))
            w.writerows([["" if v is None else v for v in r.values()] for r in rows])
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def labeled(*labels) -> list[dict]:
    return [{"text": f"review {i}", "label": label} for i, label in enumerate(labels)]


# 1. an empty label cell became a class named ''
@pytest.mark.parametrize(
    "name,rows,where",
    [
        ("d.csv", labeled("positive", None, "negative"), r"d\.csv:3: "),
        ("d.tsv", labeled("positive", None, "negative"), r"d\.tsv:3: "),
        ("d.csv", labeled("positive", "  ", "negative"), r"d\.csv:3: "),
        ("d.jsonl", labeled("positive", None, "negative"), r"d\.jsonl:2: "),
        ("d.jsonl", labeled("positive", "", "negative"), r"d\.jsonl:2: "),
        ("d.parquet", labeled("positive", None, "negative"), r"d\.parquet:2: "),
        ("ds", labeled("positive", None, "negative"), r"ds:2: "),
        ("d.csv", labeled(1, None, 0), r"d\.csv:3: "),
    ],
)
def test_an_empty_label_is_refused_in_every_format(tmp_path, name, rows, where):
    path = write(tmp_path / name, rows)
    with pytest.raises(FormatError, match=where + r'"label" is empty; every row needs a label'):
        read_labeled(path)


def test_a_missing_label_key_in_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(FormatError, match=r'd\.jsonl:2: no "label" column'):
        read_labeled(path)


# 2. numbers were read as class names
@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.parquet", "ds"])
def test_a_non_integer_number_in_a_classification_column_is_refused(tmp_path, name):
    path = write(tmp_path / name, labeled(0.0, 1.0, 2.0, 1.5, 0.0))
    line = 5 if name.endswith("sv") else 4  # the header is line 1 of a CSV/TSV
    with pytest.raises(
        FormatError,
        match=rf'{path.name}:{line}: "label" is 1\.5, not a class id .*'
        r"use --num-labels 1 for regression",
    ):
        read_labeled(path)


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.parquet", "ds"])
def test_integer_valued_numbers_are_class_ids(tmp_path, name):
    path = write(tmp_path / name, labeled(1.0, 0.0, 2.0, 1.0))
    assert [r.label for r in read_labeled(path)] == [1, 0, 2, 1]
    assert all(type(r.label) is int for r in read_labeled(path))


def test_csv_cells_that_are_numbers_are_ids_and_words_are_names(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1.0\nb,0\nc, 2 \nd,1e0\n")
    assert [r.label for r in read_labeled(path)] == [1, 0, 2, 1]
    path.write_text("text,label\na,0.0\nb,1.0\nc,neutral\n")
    with pytest.raises(
        FormatError,
        match=r'd\.csv:4: "label" is a name \("neutral"\) here but a number \(0\.0\) on '
        "line 2; use one type for every label",
    ):
        read_labeled(path)


def test_gaps_and_negative_ids_are_refused_unless_the_head_names_the_classes(tmp_path):
    path = write(tmp_path / "d.csv", labeled(0, 2, 2, 0))
    rows = read_labeled(path)
    with pytest.raises(
        FormatError,
        match=r"d\.csv: no row has class id 1 \(the ids are 0, 2\); class ids are "
        r"0\.\.K-1",
    ):
        label_ids(rows, [], data=path, eval_data=None, config={}, base="b", num_labels=None)
    with pytest.raises(FormatError, match=r"no row has class id 1"):
        label_ids(rows, [], data=path, eval_data=None, config={}, base="b", num_labels=3)
    head = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "neg", "1": "mid", "2": "pos"}}
    ids, config = label_ids(rows, [], data=path, eval_data=None, config=head, base="b", num_labels=None)
    assert ids == {0: 0, 1: 1, 2: 2} and config["id2label"] == {0: "neg", 1: "mid", 2: "pos"}
    write(tmp_path / "d.csv", labeled(0, -1))
    with pytest.raises(FormatError, match=r'd\.csv:3: "label" is -1; class ids are 0\.\.K-1'):
        read_labeled(path)


def test_check_data_reads_integer_valued_floats_as_the_same_ids_as_integers(tmp_path):
    train = write(tmp_path / "t.parquet", labeled(0.0, 1.0, 1.0, 0.0))
    held = write(tmp_path / "e.csv", labeled(1, 0))
    assert check_data("sequence-classification", train, held, config={}, base="b") == {"--data": 4, "--eval-data": 2}


# 3. a label only the eval file has added a class that never trains
@pytest.mark.parametrize(
    "train,held,label",
    [
        (labeled("negative", "positive"), labeled("positive", "neutral"), "'neutral'"),
        (labeled(0, 1, 1), labeled(1, 2), "2"),
    ],
)
def test_a_label_only_the_eval_file_has_is_refused(tmp_path, train, held, label):
    data, eval_data = write(tmp_path / "t.csv", train), write(tmp_path / "e.parquet", held)
    with pytest.raises(
        FormatError,
        match=rf"--eval-data .*e\.parquet:2: label {label} is in no row of --data "
        r".*t\.csv; a class only the evaluation has never trains",
    ):
        check_data("sequence-classification", data, eval_data, config={}, base="b", num_labels=3)


def test_a_label_the_base_head_has_may_be_evaluated_only(tmp_path):
    head = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "neg", "1": "mid", "2": "pos"}}
    data, eval_data = write(tmp_path / "t.jsonl", labeled("neg", "pos")), write(tmp_path / "e.jsonl", labeled("mid"))
    assert check_data("sequence-classification", data, eval_data, config=head, base="b") == {
        "--data": 2,
        "--eval-data": 1,
    }


@pytest.fixture(scope="module")
def eval_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-only")
    return (
        write(root / "t.csv", labeled("negative", "positive", "negative", "positive")),
        write(root / "e.jsonl", labeled("positive", "neutral")),
    )


def train_classifier(encoder, tmp_path, data, *flags):
    """`train` of a classifier on bert-bare into TMP/o, from an adapter that does not exist (TMP/none)."""
    return cli(
        "train",
        "--base",
        encoder("bert-bare"),
        "--adapter",
        tmp_path / "none",
        "--data",
        data,
        "--task",
        "sequence-classification",
        "-o",
        tmp_path / "o",
        *flags,
    )


def test_train_refuses_a_label_only_the_eval_file_has_before_anything_loads(encoder, eval_only, tmp_path):
    data, eval_data = eval_only
    res = train_classifier(encoder, tmp_path, data, "--eval-data", eval_data)
    one_line_error(res, "e.jsonl:2: label 'neutral' is in no row of --data")
    assert not (tmp_path / "o").exists()


def test_compare_refuses_a_label_only_the_eval_file_has_before_any_run(encoder, eval_only, tmp_path):
    data, eval_data = eval_only
    res = cli(
        "compare",
        encoder("bert-bare"),
        "--task",
        "sequence-classification",
        "--data",
        data,
        "--eval-data",
        eval_data,
        *"--methods lora --max-steps 1 -o".split(),
        tmp_path / "o",
    )
    one_line_error(res, "e.jsonl:2: label 'neutral' is in no row of --data")
    assert not (tmp_path / "o").exists()


def test_train_refuses_an_empty_csv_label_before_anything_loads(encoder, tmp_path):
    data = write(tmp_path / "t.csv", labeled("negative", None, "positive"))
    res = train_classifier(encoder, tmp_path, data)
    one_line_error(res, 't.csv:3: "label" is empty')
    assert not (tmp_path / "o").exists()


# 9. TSVs quoted by Python's csv module or pandas
def test_a_tsv_quoted_by_the_csv_module_is_read_as_written_by_it(tmp_path):
    path = write(tmp_path / "d.tsv", [{"text": t, "label": label} for t, label in REVIEWS])
    assert '"' in path.read_text()  # the module quoted the cells holding a newline, a tab or a quote
    assert [(r.text_a, r.label) for r in read_labeled(path)] == REVIEWS
    assert [r.line for r in read_labeled(path)] == [2, 4, 5, 6]  # the line each row starts on


def test_a_tsv_written_by_pandas_is_read_as_pandas_wrote_it(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.tsv"
    pd.DataFrame({"sentence": [t for t, _ in REVIEWS], "label": [0, 1, 0, 1]}).to_csv(path, sep="\t", index=False)
    got = read_labeled(path, columns=Columns(text="sentence"))
    assert [(r.text_a, r.label) for r in got] == [(t, i % 2) for i, (t, _) in enumerate(REVIEWS)]


def test_a_glue_tsv_keeps_its_bare_quotes(tmp_path):
    path = tmp_path / "d.tsv"
    lines = [
        "sentence\tlabel",
        'it \'s "good" , really\t1',
        '"the emperor \'s club" is a bore\t0',
        'a " stray quote\t0',
        '"\t1',
    ]
    path.write_text("\n".join(lines) + "\n")
    assert [(r.text_a, r.label) for r in read_labeled(path, columns=Columns(text="sentence"))] == [
        ('it \'s "good" , really', 1),
        ('"the emperor \'s club" is a bore', 0),
        ('a " stray quote', 0),
        ('"', 1),
    ]


@pytest.mark.parametrize(
    "text,line,opens,closes",
    [
        ('text\tlabel\nit \'s "good"\t1\n"Loved it.\nThe end pays off."\t1\nfine\t0\n', 3, 3, 4),
        ('text\tlabel\nit \'s "good"\t1\n"A tab\there."\t1\n', 3, 3, 3),
        ('text\tlabel\nit \'s "good"\t1\n"She said ""wow"" twice."\t1\n', 3, 3, 3),
        ('label\ttext\n1\tit \'s "good"\n1\t"Loved it.\nThe end pays off."\n0\tfine\n', 4, 3, 4),
    ],
)
def test_a_tsv_of_bare_quotes_and_a_quoted_cell_names_both_lines(tmp_path, text, line, opens, closes):
    path = tmp_path / "d.tsv"
    path.write_text(text)
    with pytest.raises(
        FormatError,
        match=rf"d\.tsv:{line}: a cell opens a quote on line {opens} and closes it on line "
        rf"{closes} \(as Python's csv module and pandas quote a cell holding a "
        r"newline, a tab or a quote\), but line 2 holds a bare quote",
    ):
        list(table_rows(path))


def test_a_quoted_tsv_with_a_bare_quote_names_the_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"Loved it.\nThe end pays off."\t1\nit \'s "good"\t1\n')
    with pytest.raises(
        FormatError,
        match=r"d\.tsv:4: a bare quote in a cell \(as GLUE\'s files hold\), but a cell "
        r"opens a quote on line 2 and closes it on line 3",
    ):
        list(table_rows(path))
