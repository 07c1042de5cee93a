"""Any data-free init (AILoRA, PiSSA, MiLoRA, LoRA, OLoRA, MiCA, orthogonal) of an in-memory transformers model, as
PEFT's `get_peft_model`.

For transformers' Trainer, TRL or any training loop: `get_ailora_model(model, method="ailora", rank=16)`
wraps the model with PEFT's LoRA, writes the initial factors A0, B0 into each target's lora_A / lora_B, and
replaces the target's base weight by its residual W − s·B0·A0, so the model's output is unchanged at step 0
(with `no_offset`, the weights stay as they are and step 0 is W + s·B0·A0, as the LoRA-DA authors start; MiCA and
orthogonal leave them as they are too, their B0·A0 being 0, and MiCA's lora_B is frozen).
Factors and residuals are those `decompose` writes for the same settings (same functions, same per-module
seeds): the same on the same device, bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..architectures import linear_layers, peft_task_type
from ..decomposition.quantized import quantized_residual, refits
from ..decomposition.residual import initial_factors, residual_target, working_copy
from ..devices import resolve_device
from ..errors import NumericsError, UnsupportedError
from ..init import Job, Settings, get_method, lora_scale
from ..init.dora import magnitude
from ..init.fused import job_rows
from ..init.svd import generator_for
from ..init.targets import ALL_LINEAR, architecture, assign_roles, is_transposed, matches
from ..io.tensorio import DTYPES, FLOAT_DTYPES, TensorInfo
from ..options import DecomposeOptions, InitOptions
from ..quantization.nf4 import linear4bit
from .frozen import freeze_factors

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel


def get_ailora_model(
    model: PreTrainedModel,
    options: InitOptions | None = None,
    *,
    lora_dropout: float = 0.0,
    adapter_name: str = "default",
    progress: bool = True,
    quantize: str | None = None,
    loftq_iters: int = 0,
    **settings,
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
        lora_dropout: passed to PEFT's `LoraConfig`.
        adapter_name: passed to PEFT.
        progress: show a tqdm bar.
        quantize: "nf4": each target's residual becomes a bitsandbytes `Linear4bit` (NF4, double quantisation), as
            `decompose --quantize nf4` writes it, and PEFT wraps those (QLoRA on the residual: QPiSSA for PiSSA);
            `loftq_iters` LoftQ alternations as `decompose --loftq-iters` (`decomposition.quantized`). Not with dora.

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
    return _wrap(
        model,
        options,
        settings,
        lora_dropout=lora_dropout,
        adapter_name=adapter_name,
        progress=progress,
        quantize=quantize,
        loftq_iters=loftq_iters,
    )


def _wrap(
    model,
    options,
    settings: dict,
    *,
    lora_dropout: float,
    adapter_name: str,
    progress: bool,
    quantize: str | None,
    loftq_iters: int,
):
    import torch
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    _refuse_peft_model(model)
    o = InitOptions.build(options, **settings)
    DecomposeOptions(**asdict(o), quantize=quantize, loftq_iters=loftq_iters)  # the same checks as decompose's
    init = get_method(o.method)
    if init.needs_data:
        raise UnsupportedError(
            f"method={o.method!r} needs calibration data; use `ailora-tools decompose --method "
            f"{o.method} --data ...` and load its adapter with PEFT"
        )
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        raise UnsupportedError(
            f"{type(model).__name__} has no transformers config; pass a transformers model "
            "(AutoModelFor*.from_pretrained)"
        )
    config = config.to_dict()
    arch = architecture(config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    role_of, rows = _roles(model, init, o, layers, arch, config)
    lora = _lora_config(model, o, config, arch, layers, role_of, lora_dropout)
    params = Settings(o.rank, lora_scale(o.rank, o.lora_alpha, o.rslora), o.svd, o.niter, o.oversample, o.seed)
    init.check_settings(params)
    dev = resolve_device(o.device)
    initial = None
    if quantize:  # the residuals become Linear4bit layers before PEFT wraps them (its bitsandbytes LoRA layers)
        if arch.transposed:
            raise UnsupportedError(
                f"quantize={quantize!r}: {type(model).__name__} stores its linear weights "
                "transposed (Conv1D), which bitsandbytes does not quantise; leave quantize out"
            )
        initial = _quantize_targets(model, layers, role_of, rows, init, params, dev, loftq_iters, progress)
    peft_model = get_peft_model(model, lora, adapter_name=adapter_name)
    _fill_adapter(peft_model, adapter_name, o, init, role_of, rows, arch, params, dev, initial, progress)
    freeze_factors(peft_model, init.frozen, adapter_name)  # MiCA's B
    return peft_model


def _refuse_peft_model(model) -> None:
    """A model that already holds PEFT layers is refused: the initialisation needs the plain weights."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise UnsupportedError(
            f"{type(model).__name__} already holds PEFT adapter layers; pass the plain "
            "transformers model (before get_peft_model / get_ailora_model, or after "
            "merge_and_unload())"
        )


def _lora_config(model, o: InitOptions, config: dict, arch, layers: dict, role_of: dict, lora_dropout: float):
    """PEFT's LoraConfig for the targets: their suffixes when those name exactly them, else the full names; the
    classification head as modules_to_save."""
    from peft import LoraConfig

    suffixes = sorted({m.rsplit(".", 1)[-1] for m in role_of})
    exact = {m for m in layers if any(matches(m, s) for s in suffixes)} == set(role_of)
    task = peft_task_type(config) or peft_task_type({"architectures": [type(model).__name__]})  # from a config: no
    heads = [n for n in ("classifier", "score") if task == "SEQ_CLS" and hasattr(model, n)]  # architectures yet
    return LoraConfig(
        r=o.rank,
        lora_alpha=o.lora_alpha,
        use_rslora=o.rslora,
        target_modules=suffixes if exact else sorted(role_of),
        lora_dropout=lora_dropout,
        bias="none",
        init_lora_weights=True,
        task_type=task,
        modules_to_save=heads or None,
        fan_in_fan_out=any(is_transposed(m, arch) for m in role_of),
        use_dora=o.dora,
    )


def _fill_adapter(
    peft_model,
    adapter_name: str,
    o: InitOptions,
    init,
    role_of: dict,
    rows: dict,
    arch,
    params: Settings,
    dev,
    initial: dict | None,
    progress: bool,
) -> None:
    """Each target's A0, B0 (and DoRA magnitude) into PEFT's layers, its residual into the base weight; with
    `initial` (quantised targets) the factors computed already."""
    import torch

    for m in tqdm(sorted(role_of), desc=f"{o.method} init", unit="matrix", disable=not progress or initial is not None):
        layer = peft_model.base_model.model.get_submodule(m)
        W = layer.get_base_layer().weight
        A0, B0, residual = (
            (*initial[m], None)
            if initial is not None
            else _initialise(
                W.detach(),
                init,
                _job(m, W, role_of[m], is_transposed(m, arch), rows[m]),
                params,
                dev,
                offset=not o.no_offset,
            )
        )
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(A0)
            layer.lora_B[adapter_name].weight.copy_(B0)
            if residual is not None:
                W.copy_(residual)
            if o.dora:  # PEFT set m = ‖W‖ when it wrapped the model; DoRA's m is that of the base it now sees
                layer.lora_magnitude_vector[adapter_name].weight.copy_(
                    magnitude(W.detach(), A0, B0, params.scale, transposed=is_transposed(m, arch))
                )


def _roles(model, init, o: InitOptions, layers: dict, arch, config: dict) -> tuple[dict, dict]:
    """Each target module's role and, for a fused Q/K/V matrix split between roles, its rows; weights checked."""
    linear = linear_layers(config, model) if ALL_LINEAR in o.targets else None
    role_of = assign_roles(init, list(o.targets), list(layers), arch, o.roles, linear=linear)
    _check_weights(model, {m: layers[m].weight for m in role_of}, role_of, o.rank)
    shapes = {
        m: tuple(layers[m].weight.shape[::-1] if is_transposed(m, arch) else layers[m].weight.shape) for m in role_of
    }
    return role_of, {m: job_rows(m, r, shapes[m], arch, config, o.rank) for m, r in role_of.items()}


def _quantize_targets(
    model, layers: dict, role_of: dict, rows: dict, init, params, device, iters: int, progress: bool
) -> dict:
    """Replace each target Linear by a bitsandbytes Linear4bit holding its quantised residual (`decompose
    --quantize`'s own code); return module -> (A0, B0) as the adapter starts."""
    initial = {}
    for m in tqdm(sorted(role_of), desc="quantise", unit="matrix", disable=not progress):
        W = layers[m].weight.detach()
        job = _job(m, W, role_of[m], False, rows[m])
        Wc = working_copy(job, W, device)
        A0, B0, _ = initial_factors(
            job, Wc if init.needs_weights else None, init, params, device=device if init.needs_weights else "cpu"
        )
        parts, A0, B0, _ = quantized_residual(
            job, Wc, A0, B0, params, dtype=job.tensor.dtype, iters=iters, refit=refits(job, init)
        )
        del Wc
        parent, _, name = m.rpartition(".")
        setattr(
            model.get_submodule(parent), name, linear4bit({k: v.to(W.device) for k, v in parts.items()}, layers[m].bias)
        )
        initial[m] = (A0, B0)
    model.is_loaded_in_4bit = True  # as transformers marks a bitsandbytes model: PEFT then wraps with its 4-bit LoRA
    return initial


def _job(module: str, W: torch.Tensor, role: str | None, transposed: bool, rows=None) -> Job:
    return Job(
        module,
        TensorInfo(f"{module}.weight", "the model in memory", _stored_dtype(W), tuple(W.shape), 0, 0),
        role,
        transposed,
        rows,
    )


def _initialise(W: torch.Tensor, init, job: Job, params, device, *, offset: bool = True):
    """(A0, B0, residual as stored or None) for one target, with decompose's own code and per-module seed;
    `offset` False (`no_offset`): the factors alone, the base left as it is."""
    if not (init.offsets_base and offset):  # the base stays as it is (plain LoRA, MiCA, orthogonal, no_offset)
        A0, B0, _ = (
            initial_factors(job, working_copy(job, W, device), init, params, device=device)
            if init.needs_weights
            else init.factors(job, None, params, generator=generator_for(params.seed, job.module, "cpu"))
        )
        return A0, B0, None
    residual, (A0, B0), _ = residual_target(job, W, init, params, device=device, out_dtype=None)
    return A0, B0, residual


def _check_weights(model, weights: dict[str, torch.Tensor], role_of: dict[str, str | None], rank: int) -> None:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for m, W in weights.items():
        if _stored_dtype(W) is None:
            raise UnsupportedError(
                f"{m}.weight has dtype {W.dtype} (quantized?); initialise the float model, then "
                "quantize, or use decompose on the float checkpoint"
            )
        if W.device.type == "meta":
            raise UnsupportedError(
                f"{m}.weight is on the meta device (offloaded or not loaded); load the model's "
                "weights into memory first"
            )
        if rank >= min(W.shape):
            raise NumericsError(
                f"rank={rank}: {m}.weight is {W.shape[0]}x{W.shape[1]}, so rank must be below {min(W.shape)}"
            )
        tied = [n for n in names.get(id(W), []) if n != f"{m}.weight"]
        if tied and role_of[m] is not None:  # plain LoRA leaves the weight as it is
            raise UnsupportedError(
                f"{m}.weight is tied to {', '.join(tied)}; replacing it by its residual would "
                f"change that too. Leave {m.rsplit('.', 1)[-1]} out of targets or untie the weights"
            )


def _stored_dtype(W: torch.Tensor) -> str | None:
    """W's safetensors dtype name among the float types decompose handles ("F32", "BF16", ...), else None."""
    return next((k for k in FLOAT_DTYPES if DTYPES[k][0] == str(W.dtype).removeprefix("torch.")), None)
