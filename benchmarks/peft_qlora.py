"""The baseline for training on an NF4 residual: PEFT's QLoRA on the original model, in a plain loop like `train`'s.

transformers quantises MODEL on load (BitsAndBytesConfig: NF4, double quantisation), the linear layers that
RESIDUAL (our `decompose --quantize nf4` output) keeps in float are kept in float here too, with its compute dtype;
`prepare_model_for_kbit_training` as PEFT's QLoRA docs do (unless --no-prepare); LoraConfig with ADAPTER's rank,
alpha and targets (B = 0: plain LoRA init). Then `train`'s loop: AdamW (no weight decay), the same scheduler,
bfloat16 autocast on CUDA; one metrics.jsonl record per step (tokens, seconds) in OUT, and the peak GPU memory in
$BENCH_STATS. Usage:

    python peft_qlora.py MODEL RESIDUAL ADAPTER TOKENIZER DATA OUT --steps 30 --batch-size 4 --seq 512 --device cuda
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    get_scheduler,
)

parser = argparse.ArgumentParser()
for name in ("model", "residual", "adapter", "tokenizer", "data", "out"):
    parser.add_argument(name)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--seq", type=int, default=512)
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--scheduler", default="cosine")
parser.add_argument("--device", default="cpu")
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--no-prepare", action="store_true", help="skip prepare_model_for_kbit_training")
args = parser.parse_args()

device = torch.device(args.device)
autocast = device.type == "cuda"  # as `train`: bfloat16 autocast and a bfloat16 frozen base on CUDA, float32 on CPU
ours = json.loads((Path(args.residual) / "config.json").read_text())["quantization_config"]
lora = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
bnb = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=getattr(torch, ours["bnb_4bit_compute_dtype"]),
    llm_int8_skip_modules=ours["llm_int8_skip_modules"],
)
model = AutoModelForCausalLM.from_pretrained(
    args.model, quantization_config=bnb, device_map={"": device}, dtype=torch.bfloat16 if autocast else torch.float32
)
if not args.no_prepare:  # PEFT's docs: casts the float weights left to float32, gradient checkpointing if asked
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
elif args.gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(
    model,
    LoraConfig(
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=0.0,
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    ),
)

tok = AutoTokenizer.from_pretrained(args.tokenizer)
rows = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line.strip()]
ids = [tok(t, add_special_tokens=False, truncation=True, max_length=args.seq)["input_ids"] for t in rows]
if min(map(len, ids)) < args.seq:
    raise SystemExit(
        f"{args.data}: a row has {min(map(len, ids))} tokens, fewer than --seq {args.seq}; give longer rows"
    )
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=0, num_training_steps=args.steps)
os.makedirs(args.out, exist_ok=True)
model.train()
with open(Path(args.out) / "metrics.jsonl", "w") as metrics:
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = [ids[(step * args.batch_size + i) % len(ids)] for i in range(args.batch_size)]
        input_ids = torch.tensor(batch)  # every row is --seq tokens long (checked): no padding
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(
                input_ids=input_ids.to(device),
                attention_mask=torch.ones_like(input_ids).to(device),
                labels=input_ids.to(device),
            ).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics.write(
            json.dumps(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "tokens": input_ids.numel(),
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
            + "\n"
        )
if os.environ.get("BENCH_STATS"):
    with open(os.environ["BENCH_STATS"], "w") as f:
        json.dump({"gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}, f)
