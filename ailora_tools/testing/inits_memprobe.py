"""Subprocess helper for the data-aware inits' peak-memory test: run a method's `prepare` (its calibration and
factors, as decompose runs it) and report RSS growth.

Usage: python -m ailora_tools.testing.inits_memprobe MODEL METHOD DATA WARM
Prints JSON {"baseline": bytes, "peak": bytes, "modules": count, "kept": bytes}: VmRSS just before `prepare`, VmHWM
after it, and the bytes of the factors it keeps for every module (the output, which grows with depth). Layer inputs
and gradients spill to files beyond 1 MiB (`calibrate`'s activation budget, 1 GiB by default), so that what is held
in RAM is bounded whatever the depth.
WARM, a 2-layer model of the same shapes, is calibrated first: it loads the modules used on first use and makes
torch's first allocations (a fixed cost, whatever the depth).
"""

import functools
import json
import sys
import tempfile

import ailora_tools.init.lora_da.calibration as calibration
from ailora_tools.decomposition.pipeline import plan
from ailora_tools.init import Settings, get_method, lora_scale
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.options import DecomposeOptions
from ailora_tools.testing.memprobe import settle, status

TARGETS, RANK = ("q_proj", "v_proj", "down_proj"), 4


def prepare(model: str, method: str, data: str):
    init, ckpt = get_method(method), Checkpoint.open(model)
    jobs = plan(ckpt, init, TARGETS, {}, RANK)
    settings = Settings(RANK, lora_scale(RANK, RANK, False), "exact")
    return jobs, init.prepare(
        ckpt, jobs, settings, data=data, samples=4, max_length=64, task=DecomposeOptions(), device="cpu", progress=False
    )


def kept(context) -> int:
    """Bytes of the tensors in `context` (what `prepare` returns: factors or singular triplets per module)."""
    if hasattr(context, "element_size"):
        return context.numel() * context.element_size()
    if isinstance(context, (tuple, list)):
        return sum(kept(c) for c in context)
    if isinstance(context, dict):
        return sum(kept(c) for c in context.values())
    return sum(kept(v) for v in vars(context).values()) if hasattr(context, "__dataclass_fields__") else 0


if __name__ == "__main__":
    model, method, data, warm = sys.argv[1:5]
    calibration.calibrate = functools.partial(
        calibration.calibrate, activation_budget=1 << 20, scratch=tempfile.mkdtemp()
    )
    prepare(warm, method, data)
    settle()
    baseline = status("VmRSS")
    jobs, context = prepare(model, method, data)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "modules": len(jobs), "kept": kept(context)}))
