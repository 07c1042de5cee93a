"""Stream a checkpoint into a residual base plus an initial adapter (AILoRA, PiSSA, MiLoRA, LoRA).

One way through: plan the jobs (every target matrix with its role, validated before anything is written),
compute each job's factors and residual with its init method (`ailora_tools.init`), write. The rewrite
engine (`io.rewrite.rewrite_checkpoint`) copies every shard and puts each residual in its target's byte range,
journaling each finished shard with its records for `--resume`. This module loads torch only when the first
target is read: by then the first shards are being copied and hashed, so the torch import overlaps with I/O.
Launched by torchrun, every rank plans the same jobs and computes the factors of its share of them; rank 0
computes the residuals and alone writes (`distributed`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..architectures import head_tensors, peft_task_type, task_of
from ..distributed import Sharing, is_worker, use_local_gpu, work
from ..errors import NumericsError, OptionError, UnsupportedError
from ..init import InitMethod, Job, Settings, get_method, lora_scale
from ..init.targets import architecture, assign_roles, is_transposed, linear_modules
from ..io.checkpoint import Checkpoint
from ..io.output import OutputDir
from ..io.rewrite import Hashes, Replaced, pending, rewrite_checkpoint
from ..io.tensorio import (
    DTYPE_FLAGS,
    DTYPES,
    FLOAT_DTYPES,
    TensorInfo,
    read_tensor,
    tensor_bytes,
)
from ..manifests import (
    ADAPTER_DIR,
    DECOMPOSE_MANIFEST,
    NO_OFFSET,
    ORIGINAL,
    RESIDUAL,
    RESIDUAL_DIR,
    decompose_identity,
    sample,
    stored_sample,
)
from ..options import DecomposeOptions, TaskOptions


def decompose(
    model: str | os.PathLike, out: str | os.PathLike, options: DecomposeOptions | None = None, *,
    overwrite: bool = False, resume: bool = False, progress: bool = True, **settings,
) -> dict:
    """Write OUT/residual (HF model dir), OUT/adapter (PEFT LoRA) and, last, OUT/ailora.json.

    Launched by torchrun (`torchrun --nproc-per-node N -m ailora_tools.cli decompose ...`), each rank computes
    the factors of its share of the target matrices on its own device and rank 0 writes the same bytes as one
    process (`ailora_tools.distributed`).

    Host memory above the caller's baseline: at most 64 MiB + 16 × the largest target in float32, whatever
    the checkpoint size. On CUDA, add a fixed cost for the CUDA context and its kernels (about 0.8–0.9 GB
    on an H100 with torch 2.11 + CUDA 13), paid once per process and not growing with the checkpoint.

    Args:
        model: local model directory or Hub repo id.
        out: output directory; must be empty unless `overwrite` or `resume`.
        options: a `DecomposeOptions` (every field documented there); `settings` replace its fields by name
            (`decompose(model, out, method="pissa", rank=32)`). The method is a registered init method
            (`ailora_tools.init.METHODS`): "ailora" (query principal, value minor), "pissa", "milora", "lora" or
            "lora-da"; minor components are always exact; every module's random draw is seeded by (seed, name);
            `no_residual` writes only OUT/adapter and the manifest, for training on the ORIGINAL weights with
            s·B0·A0 subtracted inside the adapter (`training.exact_mode`); `no_offset` also writes only the adapter,
            for training on the original weights as they are (the LoRA-DA authors' setting: step 0 is the model +
            s·B0·A0; the adapter applies to the original like a plain LoRA); `data`, `samples`, `max_length`, with
            `task` and the column options, are calibration settings for methods that need data (lora-da).
        overwrite, resume: see `OutputDir`. progress: show a tqdm bar.
        dora: write a DoRA adapter (`use_dora: true`) whose magnitude vectors are the row norms of
            W_base + s·B0·A0 (`init.dora`), W_base the residual as stored (the original for plain LoRA), so step 0
            reproduces the model. Not with `no_residual` for methods that offset the base.

    Returns:
        The run's summary (settings, paths, worst reconstruction error, seconds); on ranks ≥ 1 of a torchrun
        launch only {"worker": its rank, "computed", "seconds"}.

    Raises:
        AiloraError subclasses on bad input, before anything is written.

    Example:
        >>> decompose("Qwen/Qwen2.5-0.5B", "out", rank=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    o = DecomposeOptions.build(options, **settings)
    init = get_method(o.method)
    if init.needs_data and o.data is None:
        raise OptionError(f"--method {o.method}: needs calibration samples; pass --data FILE.jsonl")
    if o.data is not None and not init.needs_data:
        raise OptionError(f"--data: --method {o.method} does not use data (only lora-da does); drop --data")
    if o.data is not None:
        from ..io.tables import table_format

        table_format(o.data, "--data")  # there and readable now; its rows, for the task, in the method's `prepare`
    if o.data is None and DecomposeOptions.build(o, **TaskOptions.defaults()) != o:
        raise OptionError(f"--task and the column options: for calibration data (--data, lora-da); --method {o.method} "
                          "reads none; drop them")
    if o.device not in ("auto", "cpu"):  # a CUDA device is checked now (this loads torch); auto and cpu cannot fail
        from ..devices import resolve_device

        resolve_device(o.device)
    use_local_gpu(o.device)
    ckpt = Checkpoint.open(model, revision=o.revision, allow_pickle=o.allow_pickle,
                           scratch=Path(out).absolute().parent)
    jobs = plan(ckpt, init, o.targets, o.roles, o.rank)
    quant = _quantization(ckpt, jobs, o) if o.quantize else None
    alpha = o.lora_alpha
    params = Settings(o.rank, lora_scale(o.rank, alpha, o.rslora), o.svd, o.niter, o.oversample, o.seed)
    settings = {
        "tool": __version__, "method": o.method, "rank": o.rank, "alpha": alpha, "rslora": o.rslora,
        "scale": params.scale, "targets": list(o.targets), "roles": {j.module: j.role for j in jobs},
        "svd": {"mode": o.svd, "niter": o.niter, "oversample": o.oversample, "seed": o.seed, "device": o.device},
        "residual_dtype": o.residual_dtype, "source": ckpt.describe(),
        "adapter_base": RESIDUAL if (init.offsets_base or quant) and not (o.no_residual or o.no_offset) else ORIGINAL,
    }
    if quant:
        settings["quantize"] = {k: v for k, v in quant.items() if k != "only"}
    if o.no_offset and init.offsets_base:  # the base stays as it is and training does not subtract s·B0·A0
        settings[NO_OFFSET] = True
    if o.dora:
        settings["dora"] = True
    if o.data is not None:
        from ..io.hashing import file_digest

        settings["data"] = {"path": str(Path(o.data).absolute()), "digest": file_digest(o.data),
                            "samples": o.samples, "max_length": o.max_length, "task": task_of(o.task, ckpt.config)}
    hashes = Hashes()
    # before the output is claimed: data-aware methods calibrate here, and fail here on data or architecture
    context = init.prepare(ckpt, jobs, params, data=o.data, samples=o.samples, max_length=o.max_length,
                           task=o, device=o.device, progress=progress and not is_worker())
    device = o.device
    if is_worker():
        return {"worker": int(os.environ["RANK"]), "seconds": round(time.perf_counter() - started, 3),
                "computed": _serve(ckpt, jobs, init, params, context, device)}
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=settings) as od:
        if settings["adapter_base"] == RESIDUAL:
            results, ran_on = _residual(ckpt, od, hashes, jobs, init, params, context, device,
                                        DTYPE_FLAGS.get(o.residual_dtype), progress, quant)
            base = str(od.path / RESIDUAL_DIR)
        else:  # the base stays as it is: only the factors, but the manifest still names the source
            for name, p in ckpt.files().items():
                hashes.add("source", name, p)
            results, ran_on = _factors_only(ckpt, jobs, init, params, context, device, progress)
            base = ckpt.name_or_path
        from ..io.peft_adapter import lora_config, write_adapter

        head = {n: read_tensor(ckpt.shard(ckpt.tensors[n].file), n) for n in head_tensors(ckpt.tensors, ckpt.config)}
        config = lora_config(rank=o.rank, alpha=alpha, targets=[j.module.rsplit(".", 1)[-1] for j in jobs],
                             rslora=o.rslora, base=base, task_type=peft_task_type(ckpt.config),
                             fan_in_fan_out=any(j.transposed for j in jobs), dora=o.dora,
                             modules_to_save=sorted({n.split(".", 1)[0] for n in head}))  # PEFT loads the head
        factors = {m: f for m, (f, _) in results.items()}
        magnitudes = None
        if o.dora:  # from the base as PEFT will load it: the residual as written, or the original
            from ..init.dora import magnitudes_of

            on = Checkpoint.open(base) if settings["adapter_base"] == RESIDUAL else ckpt
            magnitudes = magnitudes_of(on, {j.module: j.tensor.name for j in jobs}, factors, params.scale,
                                       transposed={j.module: j.transposed for j in jobs})
        for p in write_adapter(od.path / ADAPTER_DIR, config, factors, magnitudes=magnitudes, extra=head):
            hashes.add("output", f"{ADAPTER_DIR}/{p.name}", p)
        stats = {m: s for m, (_, s) in results.items()}
        summary = {
            **{k: v for k, v in settings.items() if k != "roles"}, "output": str(od.path),
            "residual": base if settings["adapter_base"] == RESIDUAL else None, "adapter": str(od.path / ADAPTER_DIR), "modules": len(jobs),
            "worst_recon_rel_fro": max((s.get("recon_rel_fro", 0.0) for s in stats.values()), default=0.0),
            "worst_recon_max_abs": max((s.get("recon_max_abs", 0.0) for s in stats.values()), default=0.0),
        }
        if quant:
            from .quantized import error_table

            summary["quant_error"] = error_table(stats, o.method, o.loftq_iters)
        od.write_manifest(DECOMPOSE_MANIFEST, {**settings, "svd": {**settings["svd"], "ran_on": ran_on}, "options": asdict(o),
                                           "files": hashes.result(), "modules": dict(sorted(stats.items())),
                                           "applies_to": decompose_identity(stats, original=ckpt.name_or_path, residual=(
                                               RESIDUAL_DIR if settings["adapter_base"] == RESIDUAL else None),
                                               kind=settings["adapter_base"])})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def plan(ckpt: Checkpoint, init: InitMethod, targets, overrides: dict[str, str], rank: int) -> list[Job]:
    """Every target matrix of the checkpoint with its role, in file order; validated for dtype and rank.

    Raises:
        TargetError, UnsupportedError, NumericsError: a target that matches nothing, cannot take its role, is
            not a float matrix, or is too small for `rank`.
    """
    arch = architecture(ckpt.config)
    weights = linear_modules(ckpt.tensors)
    roles = assign_roles(init, list(targets), list(weights), arch, dict(overrides))
    jobs = [Job(m, weights[m], roles[m], is_transposed(m, arch))
            for m in sorted(roles, key=lambda m: (weights[m].file, weights[m].begin))]
    for job in jobs:
        _check_target(job.tensor, rank)
    return jobs


def _check_target(t: TensorInfo, rank: int) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; decompose supports "
                               f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)")
    if rank >= min(t.shape):
        raise NumericsError(f"--rank {rank}: {t.name!r} is {t.shape[0]}x{t.shape[1]}, so rank must be below "
                            f"{min(t.shape)}")


def _quantization(ckpt: Checkpoint, jobs: list[Job], o: DecomposeOptions) -> dict:
    """What `--quantize` writes: the settings recorded, and `only`, the weights quantised without factors
    (`--quantize-all`: every other linear weight but the model heads), by tensor name.

    Raises:
        UnsupportedError: a Conv1D model (weights stored transposed).
    """
    from ..quantization.nf4 import HEADS

    arch = architecture(ckpt.config)
    if arch.transposed:
        raise UnsupportedError(f"--quantize {o.quantize}: {ckpt.source} stores its linear weights transposed "
                               f"(Conv1D: {', '.join(arch.transposed)}), which bitsandbytes does not load pre-quantised; "
                               "decompose without --quantize")
    linear, targets = linear_modules(ckpt.tensors), {j.module for j in jobs}
    only = sorted(t.name for m, t in linear.items() if o.quantize_all and m not in targets and t.dtype in FLOAT_DTYPES
                  and m.rsplit(".", 1)[-1] not in HEADS)
    return {"type": o.quantize, "all": o.quantize_all, "loftq_iters": o.loftq_iters, "double_quant": True,
            "only": only}


def _quant_files(ckpt: Checkpoint, quantized: set[str], out_dtype: str | None, double_quant: bool) -> dict[str, bytes]:
    """config.json with the `quantization_config` transformers loads the quantised residual by."""
    import json

    from ..quantization.nf4 import quantization_config, skip_modules

    linear = linear_modules(ckpt.tensors)
    names = {m for m, t in linear.items() if t.name in quantized}
    dtypes = {linear[m].dtype for m in names}
    compute = DTYPES[out_dtype or (dtypes.pop() if len(dtypes) == 1 else "F32")][0]
    config = {**ckpt.config, "quantization_config": quantization_config(
        compute_dtype=compute, skip=skip_modules(linear, names), double_quant=double_quant)}
    return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def _residual(ckpt, od, hashes, jobs, init, params, context, device, out_dtype, progress, quant=None):
    """Rewrite the checkpoint with residual targets (quantised with `quant`); return module -> ((A0, B0), stats) and
    the device used."""
    by_tensor = {j.tensor.name: j for j in jobs}
    plan_: dict[str, list[str]] = {}
    for j in jobs:
        plan_.setdefault(j.tensor.file, []).append(j.tensor.name)
    parts, files = {}, {}
    if quant:
        from ..quantization.nf4 import parts_layout

        for name in quant["only"]:
            plan_.setdefault(ckpt.tensors[name].file, []).append(name)
        for file, names in plan_.items():
            names.sort(key=lambda n: ckpt.tensors[n].begin)
        for name in [*by_tensor, *quant["only"]]:
            t = ckpt.tensors[name]
            layout = parts_layout(t.shape, out_dtype or t.dtype, double_quant=quant["double_quant"])
            parts[name] = {f"{name}.{k}" if k else name: v for k, v in layout.items()}
        files = _quant_files(ckpt, set(parts), out_dtype, quant["double_quant"])
    sharing = Sharing.start({n: work(by_tensor[n].tensor.shape) for n in pending(ckpt, od, RESIDUAL_DIR, plan_)
                             if n in by_tensor})
    ran_on: list = []

    def compute(info: TensorInfo, W) -> Replaced:
        from ..devices import resolve_device
        from .residual import (  # torch loads here, while shards copy
            initial_factors,
            residual_of,
            working_copy,
        )

        if not ran_on:  # "auto" is resolved once torch has loaded
            ran_on.append(resolve_device(device))
        if info.name not in by_tensor:  # --quantize-all: a weight without factors
            from ..quantization.nf4 import quantize

            return _split(info.name, quantize(W, dtype=out_dtype or info.dtype), {})
        job, held = by_tensor[info.name], []

        def here():  # this rank's job: the factors from the working copy the residual is then built in
            held.append(working_copy(job, W, ran_on[0]))
            return initial_factors(job, held[0], init, params, context=context, device=ran_on[0])

        A0, B0, stats = sharing.result(info.name, here)  # or from the rank that computed them
        if quant:
            from .quantized import quantized_residual, refits

            Wc = held[0] if held else working_copy(job, W, ran_on[0])
            q, A0, B0, qstats = quantized_residual(job, Wc, A0, B0, params, dtype=out_dtype or info.dtype,
                                                   iters=quant["loftq_iters"], refit=refits(job, init.offsets_base),
                                                   double_quant=quant["double_quant"])
            return _split(info.name, q, {**stats, **qstats, "source_sample": sample(tensor_bytes(W)),
                                         "residual_sample": sample(tensor_bytes(q[""]))}, {"A": A0, "B": B0})
        stored, recon = residual_of(job, held[0] if held else working_copy(job, W, ran_on[0]), A0, B0, params.scale,
                                    out_dtype=out_dtype)
        stored = stored.cpu().contiguous()
        stats = {**stats, **recon, "source_sample": sample(tensor_bytes(W)), "residual_sample": sample(tensor_bytes(stored))}
        return Replaced(stored, {"A": A0, "B": B0}, stats)

    done = rewrite_checkpoint(ckpt, od, RESIDUAL_DIR, plan_, compute, hashes=hashes, out_dtype=out_dtype,
                              progress=progress, desc="decompose", parts=parts, files=files)
    results = {by_tensor[n].module: ((extras["A"], extras["B"]), record) for n, (extras, record) in done.items()
               if n in by_tensor}
    return results, str(ran_on[0]) if ran_on else _resolved(device)


def _split(name: str, parts: dict, record: dict, extras: dict | None = None) -> Replaced:
    """A quantised weight as the rewrite engine writes it: the packed weight in `name`'s place, its parts beside."""
    return Replaced(parts[""], extras or {}, record, parts={f"{name}.{k}": v for k, v in parts.items() if k})


def _factors_only(ckpt, jobs, init, params, context, device, progress):
    """Factors without a residual (plain LoRA, or `no_residual`): W is read only when the method looks at it,
    by its byte range; no shard is copied, so the cost is the SVDs, whatever the checkpoint's size."""
    from tqdm.auto import tqdm

    from ..devices import resolve_device

    dev = resolve_device(device)
    sharing = Sharing.start({j.tensor.name: work(j.tensor.shape) for j in jobs})
    results = {}
    for job in tqdm(jobs, desc="decompose", unit="matrix", disable=not progress):
        A0, B0, stats = sharing.result(job.tensor.name, lambda: _factors(ckpt, job, init, params, context, dev))
        results[job.module] = ((A0, B0), {**stats, "source_sample": stored_sample(ckpt, job.tensor.name)})
    return results, str(dev)


def _factors(ckpt, job: Job, init, params, context, dev):
    """(A0, B0, stats) of one job, reading W from the checkpoint only when the method looks at it."""
    from .residual import initial_factors, working_copy

    if not init.needs_weights:  # the draw stays on the CPU, whatever the device
        return initial_factors(job, None, init, params, context=context, device="cpu")
    W = read_tensor(ckpt.shard(job.tensor.file), job.tensor.name)
    return initial_factors(job, working_copy(job, W, dev), init, params, context=context, device=dev)


def _serve(ckpt, jobs, init, params, context, device) -> int:
    """Ranks ≥ 1 of a torchrun launch: compute the factors of this rank's share of rank 0's jobs; return how many."""
    from ..devices import resolve_device

    dev, by_tensor = resolve_device(device), {j.tensor.name: j for j in jobs}
    return Sharing.start(None).serve(lambda name: _factors(ckpt, by_tensor[name], init, params, context, dev))


def _resolved(device: str) -> str:
    from ..devices import resolve_device

    return str(resolve_device(device))
