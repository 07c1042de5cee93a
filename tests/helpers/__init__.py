"""Helpers the tests share: tiny real models (several shards each), their logits, digests computed independently of
ailora_tools, the command line in this process, and interrupted training. Importable as `helpers` (pyproject's
[tool.pytest.ini_options] pythonpath); the fixtures are in the conftest.py files."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

#: the repository's root (README.md, recipes/, pyproject.toml)
ROOT = Path(__file__).resolve().parents[2]


#: the tiny decoder's sizes: 2 layers, hidden 64, 4 query heads and 2 KV heads (grouped-query attention)
DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
#: the tiny encoder's sizes: 2 layers, hidden 48, 2 heads, intermediate 64
ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def make_config(kind: str):
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 KV heads
        return LlamaConfig(**DECODER)
    if kind == "qwen2":  # q/k/v biases
        return Qwen2Config(**DECODER)
    if kind == "bert":
        return BertConfig(vocab_size=100, max_position_embeddings=64, **ENCODER)
    if kind == "gpt2":
        return GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    raise ValueError(kind)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "bert": BertModel, "gpt2": GPT2LMHeadModel}


def build_model(kind: str, path, *, dtype=torch.float32, seed: int = 0, shard: str = "40KB"):
    """Save a tiny random model of `kind` at `path` in several safetensors shards."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind](make_config(kind)).to(dtype)
    with torch.no_grad():  # make biases non-zero so that they matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def load(path, kind: str):
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, kind: str) -> torch.Tensor:
    torch.manual_seed(123)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if kind == "bert" else out.logits


def lm_logits(model_dir, adapter=None) -> torch.Tensor:
    """Causal-LM logits of a saved model (float32), with a PEFT adapter on it when given, on fixed random ids."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        return model(input_ids=torch.randint(4, 90, (2, 16))).logits


def expected_digest(path: Path) -> str:
    """The manifest digest of a file, computed independently of ailora_tools: BLAKE3 of the digests of a
    safetensors file's header, tensors and gaps plus its size; plain BLAKE3 for any other file."""
    import json

    from blake3 import blake3

    data = Path(path).read_bytes()
    if Path(path).suffix != ".safetensors":
        return "blake3:" + blake3(data).hexdigest()
    start = 8 + int.from_bytes(data[:8], "little")
    spans = sorted(
        (start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in json.loads(data[8:start]).items()
        if k != "__metadata__"
    )
    cuts, at = [(0, start)], start
    for b, e in spans:
        cuts += [(at, b)] if b > at else []
        cuts.append((b, e))
        at = max(at, e)
    cuts += [(at, len(data))] if at < len(data) else []
    parts = b"".join(blake3(data[b:e]).digest() for b, e in cuts)
    return "blake3-tensors:" + blake3(parts + len(data).to_bytes(8, "little")).hexdigest()


@contextlib.contextmanager
def killed_at_update(monkeypatch, n: int):
    """The n-th optimizer update (AdamW.step) raises KeyboardInterrupt, as if the run were killed just before it;
    the block must end that way."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


def compare_briefly(base, data, out, methods: list[str], **settings) -> dict:
    """`compare` on a tiny model, as cheap as it gets: rank 4, 2 steps at lr 1e-2 in batches of 8, seed 1, CPU;
    `settings` override these."""
    from ailora_tools import compare

    brief = dict(progress=False, rank=4, max_steps=2, lr=1e-2, batch_size=8, seed=1, device="cpu")
    return compare(base, data, out, methods=methods, **{**brief, **settings})


def spm_tokenizer(root: Path, vocab_size: int = 100, **extra) -> Path:
    """A sentencepiece BPE model of `vocab_size` pieces trained on the demo corpus (unk 0, bos 1, eos 2, no pad),
    written as root/tokenizer.model; `extra`: more trainer options. Its path."""
    import sentencepiece as spm

    from ailora_tools.demo import data_file

    rows = [json.loads(line) for line in data_file("demo_train.jsonl").read_text().splitlines()]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(r["prompt"] + r["completion"] for r in rows))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **extra,
    )  # fmt: skip
    corpus.unlink()
    (root / "tokenizer.vocab").unlink()
    return root / "tokenizer.model"


def train_dec(dec, data, out, **settings):
    """`train` on the decompose output `dec` (its residual and adapter) into `out`, no progress bar; its summary."""
    from ailora_tools.training.trainer import train

    return train(dec / "residual", dec / "adapter", data, out, **{"progress": False, **settings})


def train_args(dec, data, out, *flags) -> list[str]:
    """`ailora-tools train`'s arguments for the decompose output `dec` (its residual and adapter) on `data` into
    `out`, then `flags`: as strings."""
    return [str(a) for a in ("train", "--base", dec / "residual", "--adapter", dec / "adapter")] + [
        str(a) for a in ("--data", data, "-o", out, *flags)
    ]


def cli(*args):
    """Run the `ailora-tools` command line in this process (arguments as strings); the click Result."""
    from click.testing import CliRunner

    from ailora_tools.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, *needles):
    """The command failed with exit code 1 and one `error:` line holding every needle."""
    assert res.exit_code == 1, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    for n in needles:
        assert n in res.output, res.output
