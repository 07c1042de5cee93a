"""AILoRA inside transformers' Trainer: initialise with `get_ailora_model`, train, convert to a LoRA on the original.

    python examples/trainer_get_ailora_model.py MODEL OUT    # MODEL: a causal LM directory or Hub id

With no arguments it runs on the demo's tiny model (`ailora-tools demo -o demo` first) and its data. The converted
LoRA in OUT/lora applies to the ORIGINAL model: serve it with vLLM, or merge it (`ailora-tools merge MODEL OUT/lora`).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import ailora_tools
from ailora_tools import get_ailora_model


def rows(path: Path, tokenizer, max_length: int = 64) -> list[dict]:
    """JSONL rows ({"text"}, or {"prompt", "completion"} joined) as causal-LM examples (labels = inputs)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in lines]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": ids, "labels": ids} for ids in encoded]


def main(model_dir: str = "demo/base", out: str = "trainer-run", data: str = "demo/data/train.jsonl") -> None:
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_ailora_model(model, method="ailora", rank=8, targets="q_proj,v_proj")  # a PeftModel
    model.save_pretrained(out / "init")  # the initial adapter: convert needs it
    args = TrainingArguments(
        out / "run",
        max_steps=10,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows(Path(data), tokenizer)).train()
    model.save_pretrained(out / "trained")
    summary = ailora_tools.convert(out / "trained", out / "lora", initial=out / "init")  # rank-2r LoRA, exact
    print(f"LoRA on the original model: {out / 'lora'} (rank {summary['rank']})")


if __name__ == "__main__":
    main(*sys.argv[1:])
