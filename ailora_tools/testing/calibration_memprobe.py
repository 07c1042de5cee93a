"""Subprocess helper for the calibration peak-memory test: run `calibrate` and report RSS growth.

Usage: python -m ailora_tools.testing.calibration_memprobe MODEL OPTIONS_JSON
OPTIONS_JSON: {"modules": [...], "samples": N, "tokens": T, "prompt": P, and calibrate's keyword options}.
Prints JSON {"baseline": bytes, "peak": bytes, "modules": count}: VmRSS just before calibrate and VmHWM
after it. The samples are random token ids, the first P of each without loss. Each statistics object
is dropped as soon as it arrives, as the bound assumes. A first calibration of a 2-layer model of the same
shapes (in the scratch directory) loads the modules calibrate imports on first use and makes torch's first
allocations: a fixed cost, whatever the checkpoint, that the bound leaves out (on the test's 136-layer model, 2 CPU
cores: 98 MiB above the baseline without the warm-up, 24 MiB with it; the bound is 86 MiB).
"""

import json
import sys
from pathlib import Path

import torch

from ailora_tools.init.lora_da.calibration import calibrate
from ailora_tools.io.examples import Example
from ailora_tools.testing.memprobe import settle, status
from ailora_tools.testing.synthetic import synthetic_llama

if __name__ == "__main__":
    options = json.loads(sys.argv[2])
    modules, n, tokens, prompt = (options.pop(k) for k in ("modules", "samples", "tokens", "prompt"))
    g = torch.Generator().manual_seed(0)
    vocab = json.loads(Path(sys.argv[1], "config.json").read_text())["vocab_size"]
    examples = [
        Example(ids, [-100] * prompt + ids[prompt:])
        for ids in (torch.randint(0, vocab, (tokens,), generator=g).tolist() for _ in range(n))
    ]
    cfg = json.loads(Path(sys.argv[1], "config.json").read_text())
    warm = synthetic_llama(
        Path(options["scratch"]) / "warm",
        layers=2,
        hidden=cfg["hidden_size"],
        inter=cfg["intermediate_size"],
        kv=cfg["num_key_value_heads"],
        vocab=vocab,
        head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
    )
    sum(
        1
        for _ in calibrate(
            warm,
            examples,
            [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)],
            device="cpu",
            progress=False,
            **options,
        )
    )
    settle()
    baseline = status("VmRSS")
    count = sum(1 for _ in calibrate(sys.argv[1], examples, modules, device="cpu", progress=False, **options))
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "modules": count}))
