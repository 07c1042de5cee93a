"""LoRA-DA calibration as the tests run it, and its comparison with the whole-model reference
(`ailora_tools.testing.calibration_reference`)."""

import json
import random
import string

import pytest
import torch

from ailora_tools.init.lora_da.calibration import calibrate
from ailora_tools.testing.peft_data_inits import calibration_rows
from helpers.encoders import texts

#: calibration rows of the PEFT-comparison tests (`source`)
SAMPLES = 32
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MODULES = [
    f"model.layers.{i}.{m}" for i in range(2) for m in (*ATTN, "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
]


def run(model, examples, modules=MODULES, **options) -> dict:
    """name -> the statistics `calibrate` yields for it (on the CPU, no progress bar)."""
    return {s.name: s for s in calibrate(model, examples, modules, device="cpu", progress=False, **options)}


def assert_matches_reference(got: dict, ref: dict, tol: float = 2e-5) -> None:
    """Z, E[g²] and G of each module within `tol` (relative to the largest entry) of the reference's; the same
    token and sample counts and loss."""
    for name, r in ref.items():
        s = got[name]
        for mine, theirs in ((s.input_factor, r["z"]), (s.output_factor, r["y"]), (s.gradient, r["g"])):
            assert mine.dtype == torch.float32 and mine.shape == theirs.shape
            assert (mine - theirs).abs().max() <= tol * theirs.abs().max(), name
        assert (s.tokens, s.samples) == (r["tokens"], r["samples"])
        assert s.loss == pytest.approx(r["loss"], rel=1e-5)


def samples(src, data, task, count: int = 32):
    """The calibration samples decompose reads (the same function), those with a loss token, as tensors."""
    return calibration_rows(src, data, task, count)


def source(kind, llama, encoder, tmp_path):
    """The model and its calibration data: varied enough that the input covariance has no cluster of equal
    eigenvalues (whose directions no SVD pins down, in float32 as PEFT computes or in float64 as we do)."""
    if kind == "llama":
        rng = random.Random(0)
        rows = (
            "".join(rng.choice(string.ascii_letters + string.digits + " +-=?") for _ in range(40))
            for _ in range(SAMPLES)
        )
        path = tmp_path / "random.jsonl"
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return llama, path
    return encoder("bert-mlm"), texts(tmp_path / "texts.jsonl", SAMPLES, seed=3)
