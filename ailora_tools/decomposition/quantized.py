"""A quantised residual: QLoRA on W − s·B0·A0 (QPiSSA for PiSSA's factors), optionally refined by LoftQ.

For one target W [out, in] with the method's factors (A, B): Q = NF4(W − s·B·A), stored as transformers loads it
(`quantization.nf4`). With T LoftQ iterations (arXiv 2310.08659) the pair is refitted T times: (A, B) from the r
principal singular triplets of W − dequant(Q) (the best rank-r fit of what quantisation lost, PiSSA's formula
B = U√Σ/√s, A = √Σ Vᵀ/√s, seeded per module), then Q = NF4(W − s·B·A) again. That refit keeps a method's choice
where it is the principal one (PiSSA, AILoRA's query projections) and is LoftQ proper for plain LoRA (B = 0 at the
start: Q = NF4(W) first). A minor-role target (MiLoRA, AILoRA's value projections) keeps its minor factors, and a
data-aware one (lora-da) its calibrated ones, and so do MiCA and orthogonal: the principal fit of the quantisation
error would replace exactly what the method chose, so those are quantised once.

Recorded per module: `quant_rel_fro` = ‖W − (dequant(Q) + s·B·A)‖ / ‖W‖ for the written result, `qlora_rel_fro`
for plain QLoRA on the same matrix (Q = NF4(W), B = 0), and `loftq_rel_fro`, the error after each step (step 0:
the method's factors). dequant(Q) is taken in the dtype the model computes with. Peak memory: a few copies of W.
"""

from __future__ import annotations

import torch

from ..init import InitMethod, Job, Settings
from ..init.method import svd_factors
from ..init.svd import generator_for
from ..init.targets import PRINCIPAL
from ..quantization.nf4 import dequantize, quantize


def quantized_residual(
    job: Job,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    settings: Settings,
    *,
    dtype: str,
    iters: int,
    refit: bool,
    double_quant: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict]:
    """(NF4 parts of the residual, A, B as written (float32, CPU), the module's stats) for one target.

    Args:
        job: the target. W: its `residual.working_copy` ([out, in], left unchanged). A, B: the method's factors.
        dtype: the safetensors dtype the residual dequantises to. iters: LoftQ iterations T.
        refit: whether the alternation applies to this target (principal role, or plain LoRA); else T is 0 here.
    """
    norm = max(float(torch.linalg.vector_norm(W)), torch.finfo(W.dtype).tiny)
    _, qlora = _quantize_after(W, None, None, 0.0, dtype, double_quant)
    qlora = float(torch.linalg.vector_norm(qlora)) / norm
    parts, err = _quantize_after(W, A, B, settings.scale, dtype, double_quant)
    errors = [float(torch.linalg.vector_norm(err)) / norm]
    steps = iters if refit else 0
    for _ in range(steps):
        target = err.add_((B.to(W) * settings.scale) @ A.to(W))  # W − dequant(Q), in err's memory
        A, B, _ = svd_factors(target, PRINCIPAL, settings, generator=generator_for(settings.seed, job.module, W.device))
        del target
        parts, err = _quantize_after(W, A, B, settings.scale, dtype, double_quant)
        errors.append(float(torch.linalg.vector_norm(err)) / norm)
    stats = {
        "quant_rel_fro": errors[-1],
        "qlora_rel_fro": qlora,
        "recon_rel_fro": errors[-1],
        "recon_max_abs": float(err.abs().max()),
        "loftq_iters": steps,
        **({"loftq_rel_fro": errors} if steps else {}),
    }
    return parts, A.float().cpu().contiguous(), B.float().cpu().contiguous(), stats


def refits(job: Job, method: InitMethod) -> bool:
    """Whether LoftQ's alternation applies to a target (see the module docstring); never to a method that starts at
    W + s·B0·A0 as PEFT does (MiCA's frozen B0, orthogonal's pair: `subtracts_product` False), whose factors are
    its choice."""
    return method.subtracts_product and (job.role == PRINCIPAL or not method.offsets_base)


def error_table(stats: dict[str, dict], method: str, iters: int) -> dict[str, dict[str, float]]:
    """Mean and max over modules of the recorded errors: plain QLoRA, the method's factors quantised once, and
    (T > 0) the written result after LoftQ; for `decompose`'s summary."""
    rows = {
        "qlora": [s["qlora_rel_fro"] for s in stats.values()],
        method: [s.get("loftq_rel_fro", [s["quant_rel_fro"]])[0] for s in stats.values()],
    }
    if iters:
        rows[f"{method}+loftq{iters}"] = [s["quant_rel_fro"] for s in stats.values()]
    return {k: {"mean": sum(v) / len(v), "max": max(v)} for k, v in rows.items() if v}


def _quantize_after(W, A, B, scale: float, dtype: str, double_quant: bool):
    """(NF4 parts of W − s·B·A, the error W − s·B·A − dequant(Q) in W's precision and on its device); A, B None:
    of W itself."""
    res = W.clone() if A is None else W - (B.to(W) * scale) @ A.to(W)
    parts = quantize(res, dtype=dtype, double_quant=double_quant)
    res.sub_(dequantize({k: v.to(W.device) for k, v in parts.items()}).to(W.dtype))
    return parts, res
