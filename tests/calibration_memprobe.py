"""Subprocess helper for the calibration peak-memory test: run `calibrate` and report RSS growth.

Usage: python calibration_memprobe.py MODEL OPTIONS_JSON
OPTIONS_JSON: {"modules": [...], "samples": N, "tokens": T, "prompt": P, and calibrate's keyword options}.
Prints JSON {"baseline": bytes, "peak": bytes, "modules": count}: VmRSS just before calibrate and VmHWM
after it. The samples are random token ids, the first P of each without loss. Each statistics object
is dropped as soon as it arrives, as the bound assumes.
"""
import json
import sys
from pathlib import Path

import torch

from ailora_tools.init.lora_da.calibration import calibrate
from ailora_tools.io.examples import Example
from memprobe import status  # this folder is on sys.path when run as a script

if __name__ == "__main__":
    options = json.loads(sys.argv[2])
    modules, n, tokens, prompt = (options.pop(k) for k in ("modules", "samples", "tokens", "prompt"))
    g = torch.Generator().manual_seed(0)
    vocab = json.loads(Path(sys.argv[1], "config.json").read_text())["vocab_size"]
    examples = [Example(ids, [-100] * prompt + ids[prompt:])
                for ids in (torch.randint(0, vocab, (tokens,), generator=g).tolist() for _ in range(n))]
    baseline = status("VmRSS")
    count = sum(1 for _ in calibrate(sys.argv[1], examples, modules, device="cpu", progress=False, **options))
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "modules": count}))
