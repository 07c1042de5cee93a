"""The built-in demo: the whole workflow on a tiny Llama-style model and a dataset shipped with the package.

decompose (ailora) → train → convert → merge, then a parity check: original + converted LoRA,
residual + trained adapter and the merged model must give the same logits. No network.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from importlib import resources
from pathlib import Path

import torch

from .adapters.conversion import convert
from .adapters.merging import merge
from .console import quiet_libraries
from .decomposition.pipeline import decompose
from .errors import AiloraError, OutputError
from .manifests import ADAPTER_DIR, RESIDUAL_DIR
from .training.trainer import train

MARKER = "demo.json"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PARITY_TOL = 1e-4
#: the demo model's Llama config but its vocabulary (the tokenizer's): GQA, 4 layers, hidden 128, the tokenizer's
#: special ids, an untied head
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)


def data_file(name: str) -> Path:
    """A file shipped in ailora_tools/data."""
    return Path(str(resources.files("ailora_tools") / "data" / name))


def copy_data(out: Path) -> Path:
    """Copy the demo's data files to `out/data` (train.jsonl, eval.jsonl), for the commands a user runs next."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        shutil.copyfile(data_file(f"demo_{split}.jsonl"), out / "data" / f"{split}.jsonl")
    return out / "data"


def build_tiny_model(path: str | Path, *, seed: int = 0) -> Path:
    """Save a random tiny Llama (GQA, 4 layers, hidden 128) with a character-level tokenizer, in shards."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:-2]))}
    chars = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    chars.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=chars, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), **TINY_LLAMA)).save_pretrained(path, max_shard_size="400KB")
    tok.save_pretrained(path)
    return Path(path)


def demo(out: str | Path = "ailora-demo", *, steps: int = 300, progress: bool = True) -> list[dict]:
    """Run the whole workflow in `out`; return one row per step (name, output, seconds, check, ok).

    Raises:
        OutputError: `out` exists, is not empty and is not an earlier demo.
        AiloraError: a check failed (the rows are in the message).
    """
    quiet_libraries()  # the demo prints its own table; loading bars would bury it
    out = _fresh_output(Path(out).absolute())
    log = _StepLog()
    base, results = _run_workflow(log, out, steps, progress)
    log.step(
        "parity check",
        out,
        lambda: _max_logit_difference(base, out),
        lambda d: (f"max logit difference {d:.1e} (limit {PARITY_TOL:.0e})", d <= PARITY_TOL),
    )
    rows = log.rows
    (out / MARKER).write_text(json.dumps({"steps": rows, **results}, indent=2, default=str))
    if not all(r["ok"] for r in rows):
        failed = "; ".join(f"{r['step']}: {r['check']}" for r in rows if not r["ok"])
        raise AiloraError(f"demo checks failed: {failed} (details in {out / MARKER})")
    return rows


def _run_workflow(log: _StepLog, out: Path, steps: int, progress: bool) -> tuple[Path, dict]:
    """Build, decompose, train, convert and merge in `out`, each step checked; the base and the summaries."""
    base = log.step(
        "build tiny model",
        out / "base",
        lambda: build_tiny_model(out / "base"),
        lambda p: (f"{len(list(p.glob('*.safetensors')))} shards", True),
    )
    dec = log.step(
        "decompose (ailora, r=8)",
        out / "decomposed",
        lambda: decompose(base, out / "decomposed", rank=8, progress=progress),
        lambda s: (f"worst reconstruction error {s['worst_recon_rel_fro']:.1e}", s["worst_recon_rel_fro"] < 1e-6),
    )
    tr = log.step(
        "train",
        out / "trained",
        lambda: train(
            out / "decomposed" / RESIDUAL_DIR,
            out / "decomposed" / ADAPTER_DIR,
            data_file("demo_train.jsonl"),
            out / "trained",
            eval_data=data_file("demo_eval.jsonl"),
            max_steps=steps,
            lr=1e-2,
            batch_size=16,
            warmup=10,
            progress=progress,
        ),
        lambda s: (
            f"eval loss {s['eval_loss_start']:.3f} -> {s['eval_loss']:.3f}",
            s["eval_loss"] < 0.8 * s["eval_loss_start"],
        ),
    )
    conv = log.step(
        "convert",
        out / "lora",
        lambda: convert(out / "trained", out / "lora"),
        lambda s: (
            f"rank {s['rank']}, vLLM --max-lora-rank {s['vllm_max_lora_rank']}",
            s["worst_rel_fro_error"] == 0.0,
        ),
    )
    log.step(
        "merge",
        out / "merged",
        lambda: merge(base, out / "lora", out / "merged", progress=progress),
        lambda s: (f"{s['modules']} modules merged", True),
    )
    return base, {"train": tr, "convert": conv, "decompose": dec}


def _fresh_output(out: Path) -> Path:
    """`out`, emptied: new, empty, or an earlier demo's (anything else is refused)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"-o {out}: exists and is not an earlier demo; choose another directory")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    copy_data(out)
    return out


class _StepLog:
    """The demo's table: one row per step (name, output, seconds, check, ok)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def step(self, name: str, path: Path, fn, check):
        """Run `fn`, check its result (`check` -> (text, ok)), record the row; the result."""
        t0 = time.perf_counter()
        result = fn()
        text, ok = check(result)
        self.rows.append(
            {"step": name, "output": str(path), "seconds": round(time.perf_counter() - t0, 2), "check": text, "ok": ok}
        )
        return result


def _max_logit_difference(base: Path, out: Path) -> float:
    """The largest logit difference between original + converted LoRA, residual + trained adapter and merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(["Q: 12 + 30 = ?\nA: 42", "Q: 7 - 9 = ?\nA: -2"], return_tensors="pt", padding=True)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        a = PeftModel.from_pretrained(load(base), out / "lora")(**ids).logits
        b = PeftModel.from_pretrained(load(out / "decomposed" / RESIDUAL_DIR), out / "trained")(**ids).logits
        c = load(out / "merged")(**ids).logits
    return max(float((a - b).abs().max()), float((a - c).abs().max()), float((b - c).abs().max()))
