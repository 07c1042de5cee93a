"""Tiny encoders (BERT bare, sharded, with a masked-LM or classification head; RoBERTa) with their tokenizers, the
sentiment data they learn, and the command line as the encoder tests run it."""

import json
import random
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
)

from ailora_tools.cli import main
from ailora_tools.demo import build_tiny_model
from helpers import ENCODER

POSITIVE, NEGATIVE = ["good", "great", "fine", "nice", "love"], ["bad", "awful", "poor", "hate", "terrible"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "really", "quite", "story", "acting"]
WORDS = POSITIVE + NEGATIVE + FILLER
PARITY = 1e-4
PROBE = [("the movie was good", "a really bad plot"), ("awful acting", "the story is very nice")]


def sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 1) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def sst2(path: Path, n: int, *, seed: int, names: tuple | None = None, pairs: bool = False) -> Path:
    """A GLUE-style sentiment JSONL: label 1 (or names[1]) when the sentence has a positive word. With `pairs`,
    {"text_a", "text_b", "label"}: text_b is a filler word, the label that of text_a."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a = rng.random() < 0.5
        row = {"text_a": sentence(rng, a), "text_b": rng.choice(FILLER)} if pairs else {"text": sentence(rng, a)}
        rows.append({**row, "label": names[int(a)] if names else int(a)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(path: Path, n: int, *, seed: int) -> Path:
    """A JSONL of `n` sentences ({"text"}), for masked LM."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": sentence(rng, rng.random() < 0.5)}) + "\n" for _ in range(n)))
    return path


#: at the usual init (std 0.02) a tiny random encoder's first token barely depends on the other tokens, and
#: dropout drowns the rest: nothing could learn the task in a few steps
LEARNABLE = dict(initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
#: compare's settings for a tiny BERT classifier of sentence pairs (tests/comparison's data): rank 4 on query and
#: value, batches of 8, evaluated every 2 steps, on the CPU
PAIR_CLASSIFIER = dict(
    task="sequence-classification",
    rank=4,
    targets=("query", "value"),
    batch_size=8,
    eval_every=2,
    device="cpu",
    text_column="sentence1",
    text_pair_column="sentence2",
)


def bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=len(WORDS) + 5, max_position_embeddings=64, **ENCODER, **LEARNABLE, **kw)


def build_encoder(kind: str, path: Path) -> Path:
    """Save a tiny encoder of `kind` with its tokenizer; all but bert-bare in several shards (bert-bare-sharded: the
    same BertModel in shards; llama: the demo's decoder, without a pad token id in its config, as Llama-3's)."""
    torch.manual_seed(0)
    if kind == "llama":
        build_tiny_model(path, seed=0)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
        return path
    if kind.startswith("bert"):
        BertTokenizer(
            vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
        ).save_pretrained(path)
        model = {
            "bert-bare": lambda: BertModel(bert_config()),
            "bert-bare-sharded": lambda: BertModel(bert_config()),
            "bert-mlm": lambda: BertForMaskedLM(bert_config()),
            "bert-cls": lambda: BertForSequenceClassification(
                bert_config(
                    id2label={0: "negative", 1: "neutral", 2: "positive"},
                    label2id={"negative": 0, "neutral": 1, "positive": 2},
                )
            ),
        }[kind]()
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))],
            vocab_size=300,
            min_frequency=1,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            show_progress=False,
        )
        vocab = json.loads(bpe.to_str())["model"]
        RobertaTokenizer(
            vocab=vocab["vocab"],
            merges=[tuple(m) if isinstance(m, list) else tuple(m.split()) for m in vocab["merges"]],
        ).save_pretrained(path)
        model = RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=300,
                max_position_embeddings=66,
                type_vocab_size=1,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                **ENCODER,
                **LEARNABLE,
            )
        )
    with torch.no_grad():  # non-zero biases, so that they matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, **({} if kind == "bert-bare" else {"max_shard_size": "60KB"}))
    return path


def cli(*args) -> dict | None:
    """Run the command line in this process; it must succeed. Its JSON output with --json, else None."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else None


def decompose(src: Path, out: Path) -> Path:
    """decompose (ailora, exact SVD, r 4, alpha 8) of q/v, through the command line."""
    cli(
        "decompose",
        src,
        "-o",
        out,
        *"--method ailora --svd exact --targets q_proj,v_proj --rank 4 --alpha 8 --quiet".split(),
    )  # BERT-family models resolve q_proj/v_proj to query/value
    return out


def outputs(model, src: Path) -> torch.Tensor:
    """A model's logits on the PROBE sentence pairs, tokenized with `src`'s tokenizer."""
    enc = AutoTokenizer.from_pretrained(src)(
        [a for a, _ in PROBE], [b for _, b in PROBE], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model.eval()(**enc).logits


def load_merged(auto, path: Path):
    """A merged model loaded with `auto`, every weight (the head too) found in the checkpoint."""
    model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info  # every weight, the head too, is there
    return model
