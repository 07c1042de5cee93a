"""Subprocess helper for the data-aware inits' peak-memory test: run a method's `prepare` (its calibration and
factors, as decompose runs it) and report what it held at its peak.

Usage: python -m ailora_tools.testing.inits_memprobe MODEL METHOD DATA WARM [HOLD]
Prints JSON {"tensors": bytes, "python": bytes, "modules": count, "kept": bytes}: the peak live CPU tensor bytes and
the peak Python heap during `prepare` (`held.HeldPeak`: counted, not read off RSS, so that a loaded machine does not
move them), and the bytes of the factors it keeps for every module (the output, which grows with depth). Intra-op work
runs on one thread. Layer inputs and gradients spill to files beyond 1 MiB (`calibrate`'s activation budget, 1 GiB by
default), so that what is held in RAM is bounded whatever the depth.
WARM, a 2-layer model of the same shapes, is calibrated first: it loads the modules used on first use and makes
torch's first allocations (a fixed cost, whatever the depth).
HOLD (bytes, default 0): a float32 tensor of that size kept for every layer calibrated, a deliberate leak that the
test checks the probe catches.
"""

import functools
import json
import sys
import tempfile

import torch

import ailora_tools.init.lora_da.calibration as calibration
from ailora_tools.decomposition.pipeline import plan
from ailora_tools.init import Settings, get_method, lora_scale
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.options import DecomposeOptions
from ailora_tools.testing.held import HeldPeak

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


def holding(calibrate, hold: int, leaked: list):
    """`calibrate` that keeps a `hold`-byte tensor in `leaked` for every layer whose statistics it yields."""

    def calibrate_holding(*args, **kwargs):
        for s in calibrate(*args, **kwargs):
            if s.name.endswith(TARGETS[0]):
                leaked.append(torch.ones(hold // 4))
            yield s

    return calibrate_holding


if __name__ == "__main__":
    model, method, data, warm = sys.argv[1:5]
    torch.set_num_threads(1)
    calibration.calibrate = functools.partial(
        calibration.calibrate, activation_budget=1 << 20, scratch=tempfile.mkdtemp()
    )
    prepare(warm, method, data)
    leaked = []
    if len(sys.argv) > 5:
        calibration.calibrate = holding(calibration.calibrate, int(sys.argv[5]), leaked)
    with HeldPeak() as held:
        jobs, context = prepare(model, method, data)
    print(json.dumps({"tensors": held.tensors, "python": held.python, "modules": len(jobs), "kept": kept(context)}))
