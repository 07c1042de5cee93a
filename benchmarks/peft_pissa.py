"""The baseline users compare with: PEFT's own PiSSA workflow on a whole model.

Load the model, get_peft_model(init_lora_weights="pissa" | "pissa_niter_N"), save the adapter,
unload, save the residual. Usage: python peft_pissa.py MODEL OUT --init pissa [--rank 16] [--device cpu]
"""

import argparse
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--init", default="pissa")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(args.device)
config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj"], init_lora_weights=args.init)
peft_model = get_peft_model(model, config)
peft_model.peft_config["default"].init_lora_weights = True
peft_model.save_pretrained(os.path.join(args.out, "adapter"))
peft_model.unload().save_pretrained(os.path.join(args.out, "residual"))
if os.environ.get("BENCH_STATS"):
    with open(os.environ["BENCH_STATS"], "w") as f:
        json.dump({"gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}, f)
