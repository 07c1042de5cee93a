"""AILoRA / PiSSA / MiLoRA / LoRA initialisation of an in-memory transformers model, as PEFT's `get_peft_model`.

For transformers' Trainer, TRL or any training loop: `get_ailora_model(model, method="ailora", rank=16)`
wraps the model with PEFT's LoRA, writes the initial factors A0, B0 into each target's lora_A / lora_B, and
replaces the target's base weight by its residual W − s·B0·A0, so the model's output is unchanged at step 0
(with `no_offset`, the weights stay as they are and step 0 is W + s·B0·A0, as the LoRA-DA authors start).
Factors and residuals are those `decompose` writes for the same settings (same functions, same per-module
seeds): the same on the same device, bit for bit.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..errors import AiloraError, NumericsError, UnsupportedError
from ..init import Job, Settings, get_method, lora_scale
from ..init.dora import magnitude
from ..init.targets import architecture, assign_roles, is_transposed, matches
from ..options import InitOptions

if TYPE_CHECKING:
    import torch
    from peft import PeftModel


def get_ailora_model(
    model, options: InitOptions | None = None, *, lora_dropout: float = 0.0, adapter_name: str = "default",
    progress: bool = True, **settings,
) -> PeftModel:
    """Wrap `model` in a PEFT LoRA initialised by `method`; the target base weights become residuals in place.

    Args:
        model: a transformers model (`PreTrainedModel`) in memory, float weights. It is modified in place
            (PEFT wraps it; target weights become W − s·B0·A0) and returned wrapped.
        options: an `InitOptions` (method, rank, alpha, rslora, targets, roles, svd, niter, oversample, seed,
            device, dora: as for `decompose`); `settings` replace its fields by name (`get_ailora_model(model,
            method="pissa", rank=32)`). `device` is where the SVDs run; results go back where the weights are.
            With `dora` (PEFT's `use_dora=True`) each module's magnitude vector is set to the row norms of
            W_res + s·B0·A0 (`init.dora.magnitude`), so the output is still unchanged at step 0.
        lora_dropout, adapter_name: passed to PEFT.
        progress: show a tqdm bar.

    Returns:
        The `PeftModel`. Save the initial adapter with `save_pretrained` before training to convert the trained
        one later (PEFT's `path_initial_model_for_weight_conversion`, or `ailora-tools convert --initial`).

    Raises:
        TargetError: unknown method/svd, a target or role that does not fit the model.
        UnsupportedError: not a transformers model, non-float (quantized) or meta weights, a tied target weight,
            a fused projection asked for two roles.
        NumericsError: a rank the matrix cannot give, NaN/Inf in a weight.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
        >>> model = get_ailora_model(model, method="ailora", rank=16)  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=ds).train()  # doctest: +SKIP
    """
    try:
        return _wrap(model, options, settings, lora_dropout=lora_dropout, adapter_name=adapter_name, progress=progress)
    except AiloraError as e:  # the checks are shared with the commands: name the arguments, not the flags
        e.args = (re.sub(r"--(role|[a-z]+(?:-[a-z]+)*)\b",
                         lambda m: "roles" if m[1] == "role" else m[1].replace("-", "_"), str(e)),)
        raise


def _wrap(model, options, settings: dict, *, lora_dropout: float, adapter_name: str, progress: bool):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    from ..architectures import peft_task_type
    from ..devices import resolve_device

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise UnsupportedError(f"{type(model).__name__} already holds PEFT adapter layers; pass the plain "
                               "transformers model (before get_peft_model / get_ailora_model, or after "
                               "merge_and_unload())")
    o = InitOptions.build(options, **settings)
    method, rank, alpha, rslora = o.method, o.rank, o.lora_alpha, o.rslora
    init = get_method(method)
    if init.needs_data:
        raise UnsupportedError(f"method={method!r} needs calibration data; use `ailora-tools decompose --method "
                               f"{method} --data ...` and load its adapter with PEFT")
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        raise UnsupportedError(f"{type(model).__name__} has no transformers config; pass a transformers model "
                               "(AutoModelFor*.from_pretrained)")
    config = config.to_dict()
    arch = architecture(config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    role_of = assign_roles(init, list(o.targets), list(layers), arch, o.roles)
    _check_weights(model, {m: layers[m].weight for m in role_of}, role_of, rank)
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in role_of})
    exact = {m for m in layers if any(matches(m, s) for s in suffixes)} == set(role_of)
    task = peft_task_type(config) or peft_task_type({"architectures": [type(model).__name__]})  # from a config: no
    heads = [n for n in ("classifier", "score") if task == "SEQ_CLS" and hasattr(model, n)]  # architectures yet
    lora = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=suffixes if exact else sorted(role_of),
                      lora_dropout=lora_dropout, bias="none", init_lora_weights=True, task_type=task,
                      modules_to_save=heads or None,
                      fan_in_fan_out=any(is_transposed(m, arch) for m in role_of), use_dora=o.dora)
    peft_model = get_peft_model(model, lora, adapter_name=adapter_name)
    params = Settings(rank, lora_scale(rank, alpha, rslora), o.svd, o.niter, o.oversample, o.seed)
    dev = resolve_device(o.device)
    for m in tqdm(sorted(role_of), desc=f"{method} init", unit="matrix", disable=not progress):
        layer = peft_model.base_model.model.get_submodule(m)
        W = layer.get_base_layer().weight
        A0, B0, residual = _initialise(W.detach(), init, m, role_of[m], is_transposed(m, arch), params, dev,
                                       offset=not o.no_offset)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(A0)
            layer.lora_B[adapter_name].weight.copy_(B0)
            if residual is not None:
                W.copy_(residual)
            if o.dora:  # PEFT set m = ‖W‖ when it wrapped the model; DoRA's m is that of the base it now sees
                layer.lora_magnitude_vector[adapter_name].weight.copy_(
                    magnitude(W.detach(), A0, B0, params.scale, transposed=is_transposed(m, arch)))
    return peft_model


def _initialise(W: torch.Tensor, init, module: str, role: str | None, transposed: bool, params, device, *,
                offset: bool = True):
    """(A0, B0, residual as stored or None) for one target, with decompose's own code and per-module seed;
    `offset` False (`no_offset`): the factors alone, the base left as it is."""
    from ..decomposition.residual import initial_factors, residual_target, working_copy
    from ..init.svd import generator_for
    from ..io.tensorio import TensorInfo

    job = Job(module, TensorInfo(f"{module}.weight", "the model in memory", _stored_dtype(W), tuple(W.shape), 0, 0),
              role, transposed)
    if not init.offsets_base:  # plain LoRA: the base stays as it is
        A0, B0, _ = init.factors(job, None, params, generator=generator_for(params.seed, module, "cpu"))
        return A0, B0, None
    if not offset:
        A0, B0, _ = initial_factors(job, working_copy(job, W, device), init, params, device=device)
        return A0, B0, None
    residual, (A0, B0), _ = residual_target(job, W, init, params, device=device, out_dtype=None)
    return A0, B0, residual


def _check_weights(model, weights: dict[str, torch.Tensor], role_of: dict[str, str | None], rank: int) -> None:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for m, W in weights.items():
        if _stored_dtype(W) is None:
            raise UnsupportedError(f"{m}.weight has dtype {W.dtype} (quantized?); initialise the float model, then "
                                   "quantize, or use decompose on the float checkpoint")
        if W.device.type == "meta":
            raise UnsupportedError(f"{m}.weight is on the meta device (offloaded or not loaded); load the model's "
                                   "weights into memory first")
        if rank >= min(W.shape):
            raise NumericsError(f"rank={rank}: {m}.weight is {W.shape[0]}x{W.shape[1]}, so rank must be below "
                                f"{min(W.shape)}")
        tied = [n for n in names.get(id(W), []) if n != f"{m}.weight"]
        if tied and role_of[m] is not None:  # plain LoRA leaves the weight as it is
            raise UnsupportedError(f"{m}.weight is tied to {', '.join(tied)}; replacing it by its residual would change "
                                   f"that too. Leave {m.rsplit('.', 1)[-1]} out of targets or untie the weights")


def _stored_dtype(W: torch.Tensor) -> str | None:
    """W's safetensors dtype name among the float types decompose handles ("F32", "BF16", ...), else None."""
    from ..io.tensorio import DTYPES, FLOAT_DTYPES

    return next((k for k in FLOAT_DTYPES if DTYPES[k][0] == str(W.dtype).removeprefix("torch.")), None)
