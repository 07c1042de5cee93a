"""Subprocess helper for the data-aware inits' peak-memory test: run a method's `prepare` (its calibration and
factors, as decompose runs it) and report RSS growth.

Usage: python inits_memprobe.py MODEL METHOD DATA WARM
Prints JSON {"baseline": bytes, "peak": bytes, "modules": count}: VmRSS just before `prepare` and VmHWM after it.
WARM, a 2-layer model of the same shapes, is calibrated first: it loads the modules used on first use and makes
torch's first allocations (a fixed cost, whatever the depth).
"""

import json
import sys

from memprobe import settle, status  # this folder is on sys.path when run as a script

from ailora_tools.decomposition.pipeline import plan
from ailora_tools.init import Settings, get_method, lora_scale
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.options import DecomposeOptions

TARGETS, RANK = ("q_proj", "v_proj", "down_proj"), 4


def prepare(model: str, method: str, data: str):
    init, ckpt = get_method(method), Checkpoint.open(model)
    jobs = plan(ckpt, init, TARGETS, {}, RANK)
    settings = Settings(RANK, lora_scale(RANK, RANK, False), "exact")
    return jobs, init.prepare(
        ckpt, jobs, settings, data=data, samples=8, max_length=64, task=DecomposeOptions(), device="cpu", progress=False
    )


if __name__ == "__main__":
    model, method, data, warm = sys.argv[1:5]
    prepare(warm, method, data)
    settle()
    baseline = status("VmRSS")
    jobs, context = prepare(model, method, data)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "modules": len(jobs)}))
