"""LoRA-DA calibration of encoders (BERT, RoBERTa): the layer-wise statistics equal a whole-model pass with hooks
(`calibration_reference`) for masked LM and sequence classification, through the checkpoint's own head or a new one
drawn as `train` draws it."""

import pytest
import torch
from helpers import ENCODER
from helpers.calibration import assert_matches_reference, run
from helpers.encoders import LEARNABLE
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from ailora_tools.errors import FormatError, TargetError, UnsupportedError
from ailora_tools.io.examples import IGNORE, Example
from ailora_tools.io.labels import LabeledExample
from ailora_tools.testing.calibration_reference import reference_statistics

VOCAB = 40
LAYER = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
SIZES = dict(ENCODER, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, **LEARNABLE)


def modules(prefix: str = "") -> list[str]:
    return [f"{prefix}encoder.layer.{i}.{m}" for i in range(2) for m in LAYER]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny encoders in several shards: BERT bare (no head), with a 3-class head, with its MLM head; RoBERTa MLM."""
    root = tmp_path_factory.mktemp("encoders")
    built = {
        "bert-bare": lambda: BertModel(BertConfig(**SIZES)),
        "bert-cls": lambda: BertForSequenceClassification(BertConfig(**SIZES, num_labels=3)),
        "bert-mlm": lambda: BertForMaskedLM(BertConfig(**SIZES)),
        "roberta-mlm": lambda: RobertaForMaskedLM(
            RobertaConfig(**SIZES, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
        ),
    }
    paths = {}
    for kind, build in built.items():
        torch.manual_seed(0)
        model = build()
        with torch.no_grad():  # non-zero biases, so that they matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        model.save_pretrained(root / kind, max_shard_size="30KB")
        paths[kind] = root / kind
    return paths


def masked(seed: int = 0, n: int = 6) -> list[Example]:
    """Token ids 3.. (RoBERTa's pad is 1) of different lengths, about a quarter masked (token 2), one sample without."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (5 + 3 * i,), generator=g)
        picked = torch.rand(len(ids), generator=g) < 0.25
        picked[i % len(ids)] = True
        out.append(Example(torch.where(picked, 2, ids).tolist(), torch.where(picked, ids, IGNORE).tolist()))
    out.insert(2, Example([5, 6, 7], [IGNORE] * 3))
    return out


def labeled(seed: int = 0, n: int = 6, classes: int = 3, pairs: bool = True) -> list[LabeledExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (4 + 3 * i,), generator=g).tolist()
        types = [0] * (2 + i) + [1] * (len(ids) - 2 - i) if pairs else None
        label = float(torch.randn(1, generator=g)) if classes == 1 else i % classes
        out.append(LabeledExample(ids, types, label))
    return out


CASES = {  # name: checkpoint, task, module prefix, examples, head config
    "bert masked-lm": ("bert-mlm", "masked-lm", "bert.", masked, None),
    "roberta masked-lm": ("roberta-mlm", "masked-lm", "roberta.", masked, None),
    "bert classification, its own head": ("bert-cls", "sequence-classification", "bert.", labeled, None),
    "bert classification, a new head": (
        "bert-bare",
        "sequence-classification",
        "",
        lambda: labeled(classes=2),
        {"num_labels": 2},
    ),
    "bert regression, a new head": (
        "bert-bare",
        "sequence-classification",
        "",
        lambda: labeled(classes=1),
        {"num_labels": 1, "problem_type": "regression"},
    ),
    "roberta classification, a new head": (
        "roberta-mlm",
        "sequence-classification",
        "roberta.",
        lambda: labeled(pairs=False),
        {"num_labels": 3},
    ),
}


@pytest.mark.parametrize("token_mask", ["attention", "labels"])
@pytest.mark.parametrize("case", list(CASES))
def test_statistics_equal_whole_model_hooks(encoders, case, token_mask):
    kind, task, prefix, data, labels = CASES[case]
    examples, names = data(), modules(prefix)
    ref = reference_statistics(encoders[kind], examples, names, token_mask=token_mask, task=task, labels=labels, seed=7)
    for batch_size in (1, 3):  # 3: right-padded micro-batches of different lengths
        got = run(
            encoders[kind],
            examples,
            names,
            task=task,
            labels=labels,
            seed=7,
            token_mask=token_mask,
            batch_size=batch_size,
        )
        assert sorted(got) == sorted(names)
        assert_matches_reference(got, ref)
        q, k, v = (got[f"{prefix}encoder.layer.1.{m}"] for m in LAYER[:3])
        assert q.input_factor is k.input_factor is v.input_factor  # one input, one Z
        assert q.skipped == (1 if task == "masked-lm" else 0)
        if token_mask == "labels" and task != "masked-lm":
            assert q.tokens == len(examples)  # the first token of each sample: what the head reads


def test_a_new_head_is_trains_draw_and_another_seed_another_gradient(encoders):
    """The head drawn for calibration is the one `train` starts from with the same seed; another seed gives another
    head, hence another gradient."""
    names, examples = modules(), labeled(classes=2)
    seven = run(
        encoders["bert-bare"], examples, names, task="sequence-classification", labels={"num_labels": 2}, seed=7
    )
    eight = run(
        encoders["bert-bare"], examples, names, task="sequence-classification", labels={"num_labels": 2}, seed=8
    )
    name = "encoder.layer.1.output.dense"
    assert not torch.allclose(seven[name].gradient, eight[name].gradient, rtol=0.1, atol=0)


def test_bad_encoder_input_is_one_line(encoders):
    cases = [
        (
            lambda: run(encoders["bert-bare"], masked(), modules(), task="masked-lm"),
            FormatError,
            r"tensor 'cls.predictions.bias' is missing.*needs the checkpoint's own masked-lm head",
        ),
        (
            lambda: run(encoders["bert-cls"], labeled(), modules("bert."), task="causal-lm"),
            UnsupportedError,
            r"LoRA-DA calibrates a bert model for masked-lm or sequence-classification, not for --task causal-lm",
        ),
        (
            lambda: run(encoders["bert-cls"], masked(), modules("bert."), task="sequence-classification"),
            FormatError,
            r"calibration sample 0: token labels are not what --task sequence-classification calibrates on",
        ),
        (
            lambda: run(encoders["bert-cls"], labeled(classes=5), modules("bert.")),
            FormatError,
            r"calibration sample 3: label 3 does not fit the head \(3 classes: ids 0..2\)",
        ),
        (
            lambda: run(encoders["bert-mlm"], masked(), ["bert.pooler.dense"]),
            TargetError,
            r"bert.pooler.dense: not a linear module inside an encoder layer",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as info:
            call()
        assert "\n" not in str(info.value)
