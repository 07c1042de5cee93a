"""Exact training on the ORIGINAL weights: the frozen initial product −s·B0·A0 inside each adapted module.

Two ways to train an SVD-initialised adapter (A, B start at A0, B0):
- "residual" (decompose's default): the base is W_res = W − s·B0·A0 stored in the checkpoint's dtype, and
  the model is W_res + s·B·A. For 16-bit checkpoints W_res is rounded, so what was trained differs from
  what `convert` serves (W + s(BA − B0A0)) by that rounding.
- "original" (`decompose --no-residual`): the base is W itself and every adapted module adds the frozen
  −s·B0·A0·x, so the model is W + s(B·A − B0·A0), exactly what `convert` writes. No residual is stored.

`adapter_base` is recorded in decompose's `ailora.json` and in `ailora-train.json`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import TargetError
from ..io.peft_adapter import Adapter
from ..manifests import DECOMPOSE_MANIFEST, ORIGINAL, RESIDUAL, base_of
from ..options import choice

ADAPTER_BASES = (RESIDUAL, ORIGINAL)


def resolve_adapter_base(flag: str, initial: str | os.PathLike) -> str:
    """The training mode: `flag` ("auto", "residual", "original") checked against decompose's manifest
    (`provenance.base_of`); that `--base` is the right model is `provenance.check_base`'s job.

    Raises:
        TargetError: the flag contradicts the manifest.
    """
    choice("--adapter-base", flag, ("auto",) + ADAPTER_BASES)
    recorded = base_of(initial).kind
    if flag != "auto" and recorded is not None and flag != recorded:
        again = "with" if flag == "original" else "without"
        raise TargetError(
            f"--adapter-base {flag}: the initial adapter {initial} was decomposed relative to the "
            f"{recorded} model ({Path(initial).parent / DECOMPOSE_MANIFEST}); drop the flag, or "
            f"decompose again {again} --no-residual"
        )
    return recorded or ("residual" if flag == "auto" else flag)


def subtract_initial(model, initial: Adapter) -> list:
    """Make every adapted module of a PEFT LoRA model compute W·x + s·B·A·x − s0·B0·A0·x.

    The offset uses the initial factors (float32, frozen, no dropout) on the model's device; it holds no
    parameters, so optimizers, checkpoints and saved adapters see only A and B.

    Args:
        model: a PeftModel whose adapter started from `initial`.
        initial: the initial adapter (A0, B0 and its scales).

    Returns:
        The forward-hook handles (call `.remove()` on each to train on W + s·B·A again).

    Raises:
        TargetError: a module of `initial` the model does not adapt.
        UnsupportedError: a DoRA adapter with a non-zero initial product (`dora.check_initial_offset`).

    Example:
        >>> handles = subtract_initial(peft_model, read_adapter("out/adapter"))  # doctest: +SKIP
    """
    from ..init.dora import check_initial_offset

    check_initial_offset(initial)
    base = model.get_base_model()
    handles = []
    for module, (A0, B0) in initial.factors.items():
        try:
            layer = base.get_submodule(module)
        except AttributeError as e:
            raise TargetError(
                f"initial adapter: module {module!r} is not in the model; pass the adapter the model was loaded with"
            ) from e
        device = next(layer.parameters()).device
        handles.append(
            layer.register_forward_hook(_offset(A0.float().to(device), B0.float().to(device), initial.scale(module)))
        )
    return handles


def _offset(A0: torch.Tensor, B0: torch.Tensor, scale: float):
    def hook(_module, args, out):
        x = args[0]
        product = torch.nn.functional.linear(torch.nn.functional.linear(x.to(A0.dtype), A0), B0)
        return out - (scale * product).to(out.dtype)

    return hook
