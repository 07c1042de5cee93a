"""Encoders end to end: tiny BERT saved bare (BertModel: `encoder.layer.N...`) and with a `bert.` prefix
(BertForMaskedLM, BertForSequenceClassification), tiny RoBERTa (RobertaForMaskedLM: `roberta.`), through
decompose → train (masked LM, sequence classification) → convert → merge, with logits parity between
residual + trained adapter, original + converted LoRA and both merged models, each loaded the way users load it."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import killed_at_update, train_args
from helpers.encoders import (
    PARITY,
    PROBE,
    cli,
    decompose,
    load_merged,
    outputs,
    sst2,
    texts,
)
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from ailora_tools.adapters.hub import model_card
from ailora_tools.architectures import match
from ailora_tools.cli import main
from ailora_tools.errors import FormatError
from ailora_tools.io.peft_adapter import read_adapter, write_adapter
from ailora_tools.verify import verify

RECIPE = Path(__file__).parents[2] / "recipes" / "roberta-large.toml"


def chain(src: Path, tmp: Path, task: str, data: Path, eval_data: Path, *flags) -> dict:
    """decompose → train → convert → merge twice (residual + trained, original + converted), as a user runs them."""
    dec = decompose(src, tmp / "dec")
    summary = cli(
        *train_args(dec, data, tmp / "trained", "--eval-data", eval_data, "--task", task),
        *"--lr 1e-2 --batch-size 8 --json".split(),
        *flags,
    )
    cli("convert", "--trained", tmp / "trained", "-o", tmp / "lora", "--json")
    cli("merge", dec / "residual", tmp / "trained", "-o", tmp / "m1", "--json")
    cli("merge", src, tmp / "lora", "-o", tmp / "m2", "--json")
    return summary


def assert_parity(auto, src: Path, tmp: Path, **load) -> torch.Tensor:
    expected = outputs(
        PeftModel.from_pretrained(auto.from_pretrained(tmp / "dec" / "residual", **load), tmp / "trained"), src
    )
    got = {
        "original + converted LoRA": outputs(
            PeftModel.from_pretrained(auto.from_pretrained(src, **load), tmp / "lora"), src
        ),
        "merged residual + trained": outputs(load_merged(auto, tmp / "m1"), src),
        "merged original + converted": outputs(load_merged(auto, tmp / "m2"), src),
    }
    for what, logits in got.items():
        assert (logits - expected).abs().max() <= PARITY, what
    return expected


def tensor_names(model_dir: Path) -> dict[str, set[str]]:
    """Shard file -> the tensor names its header holds."""
    names = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names[shard.name] = set(f.keys())
    return names


def adapter_keys(path: Path) -> set[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(
    "kind,prefix,heads",
    [
        ("bert-bare", "bert", ["classifier"]),  # no prefix in the checkpoint; a new head
        ("bert-mlm", "bert", ["bert.pooler", "classifier"]),  # `bert.` prefix; the MLM checkpoint has no pooler either
        ("roberta", "roberta", ["classifier"]),  # `roberta.` prefix; RoBERTa's two-layer head
        ("llama", "model", ["score"]),  # a decoder classifies at its last non-padding token
    ],
)
def test_sequence_classification_end_to_end(encoder, tmp_path, kind, prefix, heads):
    src = encoder(kind)
    pairs = kind == "bert-mlm"  # {"text_a", "text_b"} rows: BERT's token_type_ids matter
    data, evals = (
        sst2(tmp_path / "train.jsonl", 96, seed=1, pairs=pairs),
        sst2(tmp_path / "dev.jsonl", 64, seed=2, pairs=pairs),
    )
    summary = chain(src, tmp_path, "sequence-classification", data, evals, "--max-steps", "80")
    assert summary["eval_loss"] < 0.85 * summary["eval_loss_start"], summary
    assert summary["eval_accuracy"] >= summary["eval_accuracy_start"] + 0.1, summary
    # module names as PEFT expects them on AutoModelForSequenceClassification; the head as PEFT saves modules_to_save
    cfg = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("SEQ_CLS", heads)
    keys = adapter_keys(tmp_path / "trained")
    module = "layers.0.self_attn.q_proj" if kind == "llama" else "encoder.layer.0.attention.self.query"
    assert f"base_model.model.{prefix}.{module}.lora_A.weight" in keys
    assert any(k.startswith(f"base_model.model.{heads[-1]}.") and "lora" not in k for k in keys)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"] == heads
    assert adapter_keys(tmp_path / "lora") >= {k for k in keys if "lora_" not in k}
    pad = {"pad_token_id": 3} if kind == "llama" else {}  # the tokenizer's, as the merged config records it
    assert_parity(AutoModelForSequenceClassification, src, tmp_path, num_labels=2, **pad)
    merged = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert kind != "llama" or merged["pad_token_id"] == 3  # which the base's config lacked
    assert ("pad_token_id=3" in model_card(tmp_path / "lora")) == (kind == "llama")
    assert merged["architectures"] == [
        {"bert": "Bert", "roberta": "Roberta", "model": "Llama"}[prefix] + "ForSequenceClassification"
    ]
    assert merged["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    if kind == "bert-bare":  # saved as BertForSequenceClassification saves itself: the base under `bert.`, the head
        for m in ("m1", "m2"):
            assert {n.split(".")[0] for names in tensor_names(tmp_path / m).values() for n in names} == {
                "bert",
                "classifier",
            }
    assert verify(tmp_path / "m1")["problems"] == [] and verify(tmp_path / "m2")["problems"] == []


def test_classification_on_a_checkpoint_with_its_own_head(encoder, tmp_path):
    """BertForSequenceClassification with 3 named labels: string labels map to its ids, the head's tensors are
    replaced in place (none added) and config.json keeps its labels."""
    src = encoder("bert-cls")
    names = ("negative", "positive")
    data, evals = (
        sst2(tmp_path / "t.jsonl", 96, seed=1, names=names),
        sst2(tmp_path / "d.jsonl", 64, seed=2, names=names),
    )
    summary = chain(src, tmp_path, "auto", data, evals, "--max-steps", "80")  # auto: ...ForSequenceClassification
    assert summary["eval_loss"] < 0.85 * summary["eval_loss_start"], summary
    logits = assert_parity(AutoModelForSequenceClassification, src, tmp_path)
    assert logits.shape == (2, 3)
    manifest = json.loads((tmp_path / "m2" / "ailora-merge.json").read_text())
    assert manifest["summary"]["head_tensors"] == ["classifier.bias", "classifier.weight"]
    merged = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert merged["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    with safe_open(str(next((tmp_path / "m2").glob("*.safetensors"))), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    index = json.loads((tmp_path / "m2" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("kind", ["bert-mlm", "roberta"])
def test_masked_lm_end_to_end(encoder, tmp_path, kind):
    src = encoder(kind)
    data, evals = texts(tmp_path / "t.jsonl", 64, seed=1), texts(tmp_path / "d.jsonl", 32, seed=2)
    summary = chain(src, tmp_path, "auto", data, evals, "--max-steps", "30")  # auto: ...ForMaskedLM → masked-lm
    assert summary["eval_loss"] < summary["eval_loss_start"] and "eval_accuracy" not in summary
    cfg = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and json.loads((tmp_path / "trained" / "ailora-train.json").read_text())[
        "task"
    ]["model_class"].endswith("ForMaskedLM")
    assert_parity(AutoModelForMaskedLM, src, tmp_path)


def test_adapter_named_for_the_task_class_converts_and_merges_on_a_bare_checkpoint(encoder, tmp_path):
    """The issue's prefix case, which failed before: the initial adapter names `encoder.layer.0...` (a bare BertModel
    checkpoint), the trained one `bert.encoder.layer.0...` (the class users train with). convert used to fail with
    "initial and trained adapters adapt different modules", merge with "... has no tensor bert.encoder...". Here
    the trained adapter is written as PEFT writes one, with no record of the prefix."""
    src = encoder("bert-bare")
    dec = decompose(src, tmp_path / "dec")
    initial = read_adapter(dec / "adapter")
    g = torch.Generator().manual_seed(0)
    trained = {
        f"bert.{m}": (A + 0.05 * torch.randn(A.shape, generator=g), B + 0.05 * torch.randn(B.shape, generator=g))
        for m, (A, B) in initial.factors.items()
    }
    assert all(m.startswith("encoder.layer.") for m in initial.factors)
    write_adapter(tmp_path / "trained", initial.config, trained)
    (tmp_path / "trained" / "ailora-train.json").write_text(json.dumps({"initial_adapter": str(dec / "adapter")}))
    cli("convert", "--trained", tmp_path / "trained", "-o", tmp_path / "lora", "--json")
    cli("merge", dec / "residual", tmp_path / "trained", "-o", tmp_path / "m1", "--json")
    cli("merge", src, tmp_path / "lora", "-o", tmp_path / "m2", "--json")

    def hidden(model):  # the encoder's output: the part the adapter changes
        enc = AutoTokenizer.from_pretrained(src)([a for a, _ in PROBE], padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.eval()(**enc).last_hidden_state

    on_class = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(dec / "residual"), tmp_path / "trained"
    )
    expected = hidden(on_class.base_model.model.bert)
    original = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(src), tmp_path / "lora")
    assert (hidden(original.base_model.model.bert) - expected).abs().max() <= PARITY
    for merged in ("m1", "m2"):
        assert (hidden(load_merged(AutoModel, tmp_path / merged)) - expected).abs().max() <= PARITY
    assert (hidden(AutoModel.from_pretrained(src)) - expected).abs().max() > 1e-3  # the adapter changed something


def test_bare_sharded_base_that_gets_a_head_is_renamed_in_every_shard_and_the_index(encoder, tmp_path):
    """transformers before v5 refuses a checkpoint mixing bare base tensors (`encoder...`) and a head: merge writes
    the base under `bert.` in every shard header and in the index, which names exactly what the shards hold."""
    src = encoder("bert-bare-sharded")
    dec = decompose(src, tmp_path / "dec")
    data = sst2(tmp_path / "t.jsonl", 16, seed=1)
    cli(
        *train_args(dec, data, tmp_path / "trained"),
        *"--task sequence-classification --max-steps 3 --lr 1e-2 --quiet".split(),
    )
    cli("merge", dec / "residual", tmp_path / "trained", "-o", tmp_path / "m", "--quiet")
    shards = tensor_names(tmp_path / "m")
    assert len(shards) > 1 and set(shards) == set(tensor_names(src))  # same shard files; the head in the last
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {n: shard for shard, names in shards.items() for n in names}
    assert {n.split(".")[0] for n in index} == {"bert", "classifier"}
    assert {f"bert.{n}" for names in tensor_names(src).values() for n in names} | {
        "classifier.weight",
        "classifier.bias",
    } == set(index)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = outputs(
        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(dec / "residual", num_labels=2), tmp_path / "trained"
        ),
        src,
    )
    assert (outputs(model, src) - expected).abs().max() <= PARITY
    assert verify(tmp_path / "m")["problems"] == []


@pytest.mark.parametrize("kind,task", [("bert-bare", "sequence-classification"), ("bert-mlm", "masked-lm")])
def test_training_starts_from_the_decomposed_factors(encoder, tmp_path, kind, task):
    """The model train builds is residual + A0, B0 under the class's names, so its encoder computes what the
    original's does (PEFT's own loading would leave a bare checkpoint's factors out, with only a warning, and start
    from B = 0 on the residual)."""
    from ailora_tools.training.tasks import TASKS, load_model

    src = encoder(kind)
    dec = decompose(src, tmp_path / "dec")
    labels = {"num_labels": 2} if task == "sequence-classification" else None
    model, config, record = load_model(
        TASKS[task], dec / "residual", dec / "adapter", labels=labels, dtype=torch.float32
    )
    assert record["base_model_prefix"] == "bert" and config["task_type"] == TASKS[task].peft_task_type
    assert record["auto_class"] == TASKS[task].auto_class
    initial = read_adapter(dec / "adapter")
    state = model.state_dict()
    for m, (A, B) in initial.factors.items():  # exactly A0, B0, under the class's module names
        name = m if m.startswith("bert.") else f"bert.{m}"
        assert torch.equal(state[f"base_model.model.{name}.lora_A.default.weight"], A)
        assert torch.equal(state[f"base_model.model.{name}.lora_B.default.weight"], B)
    enc = AutoTokenizer.from_pretrained(src)([a for a, _ in PROBE], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model.eval().base_model.model.bert(**enc).last_hidden_state
        want = AutoModel.from_pretrained(src).eval()(**enc).last_hidden_state
        residual = AutoModel.from_pretrained(dec / "residual").eval()(**enc).last_hidden_state
    assert (got - want).abs().max() <= PARITY
    assert (residual - want).abs().max() > 1e-2  # the adapter carries the principal/minor components


def test_classification_resume_continues_as_if_uninterrupted(bare_decomposed, tmp_path, monkeypatch):
    """Checkpoints hold the head too: a run killed after step 6 and resumed from step 5 ends byte-identical."""
    from ailora_tools.training.trainer import train

    data = sst2(tmp_path / "t.jsonl", 32, seed=1)
    args = (bare_decomposed / "residual", bare_decomposed / "adapter", data)
    opts = dict(task="sequence-classification", max_steps=10, lr=5e-3, batch_size=8, save_every=5, progress=False)
    train(*args, tmp_path / "straight", **opts)
    with killed_at_update(monkeypatch, 7):  # the 7th update never happens: as if killed after step 6
        train(*args, tmp_path / "resumed", **opts)
    checkpoint = read_adapter(tmp_path / "resumed" / "checkpoints" / "step-0000005")
    assert set(checkpoint.extra) == {"classifier.weight", "classifier.bias"}  # the head is in the checkpoint
    train(*args, tmp_path / "resumed", resume=True, **opts)
    a, b = (read_adapter(tmp_path / d) for d in ("straight", "resumed"))
    assert set(a.extra) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(t, b.extra[name]) for name, t in a.extra.items())
    assert not torch.equal(a.extra["classifier.weight"], checkpoint.extra["classifier.weight"])  # it trained on
    assert (tmp_path / "straight" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "resumed" / "adapter_model.safetensors"
    ).read_bytes()


def test_names_pair_across_the_base_model_prefix():
    modules = {"bert.encoder.layer.0.attention.self.query", "classifier"}
    assert match(["encoder.layer.0.attention.self.query", "classifier", "pooler"], modules, prefix="bert") == {
        "encoder.layer.0.attention.self.query": "bert.encoder.layer.0.attention.self.query",
        "classifier": "classifier",
    }
    assert match(
        ["bert.encoder.layer.0.attention.self.query"],
        {"encoder.layer.0.attention.self.query"},
        config={"model_type": "bert"},
    ) == {"bert.encoder.layer.0.attention.self.query": "encoder.layer.0.attention.self.query"}
    assert match(["model.layers.0.q_proj"], {"layers.0.q_proj"}, prefix="bert") == {}


def test_recipe_runs_classification_end_to_end(encoder, tmp_path):
    """recipes/roberta-large.toml's [decompose] and [train] tables on a tiny RoBERTa and a GLUE-style task with
    named labels (as GLUE's SST-2 files name them)."""
    src = encoder("roberta")
    recipe = tmp_path / "roberta.toml"
    text = RECIPE.read_text()
    assert 'model = "FacebookAI/roberta-large"' in text
    recipe.write_text(text.replace('model = "FacebookAI/roberta-large"', f'model = "{src}"'))
    names = ("negative", "positive")
    data = sst2(tmp_path / "train.jsonl", 96, seed=1, names=names)
    evals = sst2(tmp_path / "dev.jsonl", 64, seed=2, names=names)
    cli("decompose", "--config", recipe, "-o", tmp_path / "dec", "--quiet")
    decomposed = json.loads((tmp_path / "dec" / "ailora.json").read_text())
    assert (decomposed["method"], decomposed["rank"], decomposed["svd"]["mode"]) == ("ailora", 8, "exact")
    assert {r for r in decomposed["roles"].values()} == {"principal", "minor"}
    # a tiny random model needs a larger step and fewer of them than RoBERTa-large on SST-2: flags win over the recipe
    summary = cli(
        "train",
        "--config",
        recipe,
        "--base",
        tmp_path / "dec" / "residual",
        "--adapter",
        tmp_path / "dec" / "adapter",
        "--data",
        data,
        "--eval-data",
        evals,
        "-o",
        tmp_path / "trained",
        *"--max-steps 80 --batch-size 8 --warmup 4 --lr 1e-2 --json".split(),
    )
    manifest = json.loads((tmp_path / "trained" / "ailora-train.json").read_text())
    assert manifest["task"]["task"] == "sequence-classification"  # from the recipe, as are these:
    assert (manifest["scheduler"], manifest["max_length"], manifest["seed"]) == ("linear", 512, 0)
    assert summary["eval_accuracy"] >= summary["eval_accuracy_start"] + 0.1, summary
    cli("convert", "--trained", tmp_path / "trained", "-o", tmp_path / "lora", "--json")
    for adapter in ("trained", "lora"):  # the card loads the adapter on the class its module names are for
        card = model_card(tmp_path / adapter)
        assert "from transformers import AutoModelForSequenceClassification" in card
        assert "PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(" in card
        assert "num_labels=2)" in card and "AutoModelForCausalLM" not in card
    cli("merge", src, tmp_path / "lora", "-o", tmp_path / "merged", "--json")
    model = load_merged(AutoModelForSequenceClassification, tmp_path / "merged")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    expected = outputs(
        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(tmp_path / "dec" / "residual", num_labels=2),
            tmp_path / "trained",
        ),
        src,
    )
    assert (outputs(model, src) - expected).abs().max() <= PARITY


@pytest.fixture(scope="module")
def bare_decomposed(encoder, tmp_path_factory):
    return decompose(encoder("bert-bare"), tmp_path_factory.mktemp("bad") / "dec")


@pytest.mark.parametrize(
    "rows,flags,message",
    [
        ([{"text": "good"}], [], r't\.jsonl:1: no "label" column'),
        (
            [{"text": "good", "label": 1}, {"text": "bad", "label": "neg"}],
            [],
            r't\.jsonl:2: "label" is a string here but an integer on line 1',
        ),
        ([{"text": "good", "label": True}], [], r't\.jsonl:1: "label" is true; labels are class ids'),
        (
            [{"text": "good", "label": 2}],
            ["--num-labels", "2"],
            r"t\.jsonl:1: label 2, but --num-labels 2 has 2 labels \(ids 0\.\.1\)",
        ),
        (
            [{"text": "good", "label": "a"}, {"text": "x", "label": "b"}, {"text": "y", "label": "c"}],
            ["--num-labels", "2"],
            r"t\.jsonl: 3 label names \(a, b, c\), but --num-labels 2 has 2 labels",
        ),
        ([{"text": "good"}], ["--task", "masked-lm", "--num-labels", "2"], r"--num-labels 2: applies to --task "),
    ],
)
def test_bad_classification_input_is_one_line(bare_decomposed, tmp_path, rows, flags, message):
    import re

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(
        main,
        [
            *train_args(bare_decomposed, data, tmp_path / "o"),
            "--task",
            "sequence-classification",
            *flags,
        ],
    )
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), res.output
    assert not (tmp_path / "o").exists()  # validated before any model loads or anything is written


def test_eval_labels_of_another_type_and_too_many_for_the_head(encoder, bare_decomposed, tmp_path):
    train_rows, eval_rows = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    train_rows.write_text(json.dumps({"text": "good", "label": 1}) + "\n")
    eval_rows.write_text(json.dumps({"text": "bad", "label": "neg"}) + "\n")
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--base",
            str(bare_decomposed / "residual"),
            "--adapter",
            str(bare_decomposed / "adapter"),
            "--data",
            str(train_rows),
            "--eval-data",
            str(eval_rows),
            "-o",
            str(tmp_path / "o"),
            "--task",
            "sequence-classification",
        ],
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert 'd.jsonl:1: "label" is a string but an integer in' in res.output
    dec = decompose(encoder("bert-cls"), tmp_path / "cls")  # its head has 3 labels
    train_rows.write_text(json.dumps({"text": "good", "label": 3}) + "\n")
    res = CliRunner().invoke(
        main,
        [
            *train_args(dec, train_rows, tmp_path / "o"),
        ],
    )  # auto: classification
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert (
        "t.jsonl:1: label 3, but the classification head of" in res.output and "has 3 labels (ids 0..2)" in res.output
    )


def test_masked_lm_needs_a_checkpoint_with_its_head(bare_decomposed, tmp_path):
    data = texts(tmp_path / "t.jsonl", 8, seed=0)
    res = CliRunner().invoke(
        main,
        [
            *train_args(bare_decomposed, data, tmp_path / "o"),
        ],
    )
    assert res.exit_code == 1, res.output  # auto on a bare encoder: masked LM, and BertModel has no MLM head
    last = res.output.strip().splitlines()[-1]
    assert "--task masked-lm: BertForMaskedLM needs weights that" in last and "--task sequence-classification" in last


def test_check_rows_knows_the_task(tmp_path):
    """train checks rows before any model loads, by the task's shapes: labeled rows pass for classification only."""
    from ailora_tools.io.examples import check_rows

    labeled, pairs = tmp_path / "l.jsonl", tmp_path / "p.jsonl"
    labeled.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(3)))
    pairs.write_text(json.dumps({"text_a": "a", "text_b": "b", "label": "yes"}) + "\n")
    assert check_rows(labeled, task="sequence-classification") == 3
    assert check_rows(pairs, task="sequence-classification") == 1
    with pytest.raises(FormatError, match=r'l\.jsonl:1: rows with "label" are for --task sequence-classification'):
        check_rows(labeled)  # causal LM
    with pytest.raises(
        FormatError,
        match=r'p\.jsonl:1: masked-LM rows are \{"text"\} \(rows with "label" are for '
        r"--task sequence-classification\)",
    ):
        check_rows(pairs, task="masked-lm")
    prompts = tmp_path / "c.jsonl"
    prompts.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(FormatError, match=r'c\.jsonl:1: no "label" column'):
        check_rows(prompts, task="sequence-classification")


def test_masked_lm_rows_may_carry_other_keys(encoder, tmp_path):
    """As causal-LM rows may: {"text", "id"} rows pass the check and are masked exactly as {"text"} rows are; a row
    without "text" is still refused with its line number."""
    from ailora_tools.io.examples import check_rows, load_masked_jsonl

    plain, extra = texts(tmp_path / "plain.jsonl", 8, seed=3), tmp_path / "extra.jsonl"
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    extra.write_text("".join(json.dumps({"id": i, **r, "source": "sst2"}) + "\n" for i, r in enumerate(rows)))
    assert check_rows(extra, task="masked-lm") == 8
    tok = AutoTokenizer.from_pretrained(encoder("bert-mlm"))
    a, b = (load_masked_jsonl(p, tok, max_length=32, seed=0) for p in (plain, extra))
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]
    extra.write_text(json.dumps({"text": "good"}) + "\n" + json.dumps({"sentence": "bad", "id": 1}) + "\n")
    with pytest.raises(FormatError, match=r'extra\.jsonl:2: masked-LM rows are \{"text"\}$'):
        check_rows(extra, task="masked-lm")


def test_merge_with_dtype_writes_the_head_and_its_labels_in_one_config(bare_decomposed, tmp_path):
    """--dtype and a new head both change config.json: the merged one names the class, the labels and the dtype,
    every float tensor (the added head too) is in that dtype, and it computes what the float32 merge computes."""
    data = sst2(tmp_path / "t.jsonl", 16, seed=1)
    cli(
        *train_args(bare_decomposed, data, tmp_path / "trained"),
        *"--task sequence-classification --max-steps 3 --lr 1e-2 --quiet".split(),
    )
    cli("merge", bare_decomposed / "residual", tmp_path / "trained", "-o", tmp_path / "m32", "--quiet")
    summary = cli(
        "merge",
        bare_decomposed / "residual",
        tmp_path / "trained",
        "-o",
        tmp_path / "m16",
        "--dtype",
        "bfloat16",
        "--json",
    )
    assert "classifier.weight" in summary["head_tensors"]
    config = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    with safe_open(str(tmp_path / "m16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "classifier.weight" in set(f.keys())
    src = bare_decomposed / "residual"
    full = outputs(load_merged(AutoModelForSequenceClassification, tmp_path / "m32"), src)
    half = outputs(load_merged(AutoModelForSequenceClassification, tmp_path / "m16").float(), src)
    assert (half - full).abs().max() <= 0.05 * full.abs().max() + 1e-2
    assert verify(tmp_path / "m16")["problems"] == []
