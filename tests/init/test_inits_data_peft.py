"""corda and lora-ga match PEFT's own init (peft 0.21: `preprocess_corda` / `preprocess_loraga`, then
`get_peft_model`) on a tiny Llama and a tiny BERT, on the same calibration samples: the factors (each singular
direction up to its sign, which PEFT's SVD leaves free), the residual base, and the step-0 outputs.

PEFT's LoRA-GA takes the gradient's SVD with `torch.svd_lowrank(q=min(4r, min(shape)))`, a random projection drawn
from torch's global generator: exact only when q reaches min(shape), so the ranks here are chosen for that (4r = the
hidden size) and the comparison is deterministic. Its `random` direction draws from the same unseeded generator
(ours per module from --seed); its `weight_svd` scale estimates σ_max(W) by the same random projection (ours exact).
"""

import pytest
import torch
from helpers import cli
from helpers.calibration import SAMPLES, samples, source
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from ailora_tools.init import lora_scale
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.testing.peft_data_inits import peft_init as reference

#: (kind, auto class, task, targets, rank, alpha): 4r is the width of the targets' smaller side (see above)
CASES = {
    "llama": (AutoModelForCausalLM, "causal-lm", ("q_proj", "o_proj"), 16, 8.0),
    "bert": (AutoModelForMaskedLM, "masked-lm", ("query", "value"), 12, 24.0),
}


def peft_init(src, auto, kind, method, data, task, targets, rank, alpha, **config):
    """PEFT's own init: its model (residual + adapter)."""
    model = auto.from_pretrained(src, dtype=torch.float32)
    rows = samples(src, data, task)
    return reference(model, method, rows, rank=rank, alpha=alpha, targets=targets, **config)[0].eval()


def ours(src, out, method, data, task, targets, rank, alpha, *flags):
    res = cli(
        "decompose",
        src,
        "-o",
        out,
        "--method",
        method,
        "--data",
        data,
        "--task",
        task,
        "--samples",
        str(SAMPLES),
        "--max-length",
        "64",
        "--targets",
        ",".join(targets),
        "--rank",
        str(rank),
        "--alpha",
        str(alpha),
        "--svd",
        "exact",
        "--quiet",
        *flags,
    )
    assert res.exit_code == 0, res.output
    return load_file(out / "adapter" / "adapter_model.safetensors"), Checkpoint.open(out / "residual")


def signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sign of each row of `a` that best matches the same row of `b`."""
    return torch.where((a * b).sum(1) < 0, -1.0, 1.0)


@pytest.mark.parametrize(
    "kind,method,config,flags",
    [
        ("llama", "corda", {}, ()),
        ("llama", "corda", {"corda_mode": "kpm"}, ("--corda-mode", "kpm")),
        ("bert", "corda", {}, ()),
        ("llama", "lora-ga", {}, ()),
        ("bert", "lora-ga", {}, ()),
        (
            "llama",
            "lora-ga",
            {"direction": "ArBr", "scale": "gd_scale"},
            ("--ga-direction", "ArBr", "--ga-scale", "gd_scale"),
        ),
        # (not A2rBr on this BERT: its gradients from 32 short sentences have rank below 2r, so A0's rows r..2r would
        # be null-space directions that neither SVD determines)
        ("bert", "lora-ga", {"scale": "unit"}, ("--ga-scale", "unit")),
    ],
)
def test_same_factors_residual_and_start_as_peft(llama, encoder, tmp_path, kind, method, config, flags):
    auto, task, targets, rank, alpha = CASES[kind]
    src, data = source(kind, llama, encoder, tmp_path)
    peft = peft_init(src, auto, kind, method.replace("-", "_"), data, task, targets, rank, alpha, **config)
    adapter, residual = ours(src, tmp_path / "d", method, data, task, targets, rank, alpha, *flags)
    original = auto.from_pretrained(src, dtype=torch.float32).eval()
    s = lora_scale(rank, alpha, False)
    # KPM keeps W·C's smallest directions, which PEFT's float32 SVD finds only to about eps32·σ_max over their gaps;
    # LoRA-GA's gradient, summed layer by layer here and through the whole model there, agrees to float32 rounding
    # PEFT computes in float32, ours in float64: one element of 2048 sat at 1.1e-4 of the largest in IPM (2.8e-5)
    tol = {"kpm": 3e-2, "lora-ga": 1e-3}.get(config.get("corda_mode", method), 5e-4)
    checked = 0
    for name, layer in peft.base_model.model.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        key = f"base_model.model.{name}"
        A, B = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
        pA, pB = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        dA, dB = signs(A, pA), signs(B.T, pB.T)  # each direction up to its sign
        torch.testing.assert_close(A * dA[:, None], pA, rtol=0, atol=tol * float(pA.abs().max()))
        torch.testing.assert_close(B * dB, pB, rtol=0, atol=tol * float(pB.abs().max()))
        if method == "corda":  # A's and B's directions pair up: one sign each
            assert torch.equal(dA, dB)
        W = original.get_submodule(name).weight.detach()
        stored = residual.tensors[f"{name}.weight"].name if f"{name}.weight" in residual.tensors else None
        ours_res = load_file(residual.root / residual.tensors[stored].file)[stored]
        # PEFT's residual, with our signs: W − s·(B·D_B)(D_A·A)
        expect = layer.get_base_layer().weight.detach() + s * pB @ pA - s * (pB * dB) @ (dA[:, None] * pA)
        torch.testing.assert_close(ours_res, expect, rtol=0, atol=2 * tol * float((s * pB @ pA).abs().max()))
        assert (W - ours_res).abs().max() > 1e-4 * W.abs().max()  # the base is offset
        checked += 1
    assert checked == 2 * original.config.num_hidden_layers
    ids = samples(src, data, task)[0][0]
    with torch.no_grad():
        want = original(input_ids=ids).logits
        torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=0, atol=1e-4)
