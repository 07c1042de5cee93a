"""Stream a checkpoint into a residual base plus an initial adapter (AILoRA, PiSSA, MiLoRA, LoRA).

One way through: plan (every target matrix with its role, the options and the manifest's settings, validated before
anything is written; the run's context in a `DecomposeRun`), then execute: compute each job's factors and residual
with its init method (`ailora_tools.init`) and write the residual (`residual_checkpoint`, over the rewrite engine
`io.rewrite`, journaled per shard for `--resume`) or only the factors (`factors`), the adapter, the manifest. This
module loads torch only when the first target is read: by then the first shards are being copied and hashed, so the
torch import overlaps with I/O. Launched by torchrun, every rank plans the same jobs and computes the factors of its
share of them; rank 0 computes the residuals and alone writes (`distributed`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from .. import __version__
from ..architectures import head_tensors, peft_task_type, task_of
from ..distributed import is_worker, use_local_gpu
from ..errors import NumericsError, OptionError, UnsupportedError
from ..experts import expert_slices
from ..init import METHODS, InitMethod, Job, Settings, get_method, lora_scale
from ..init.experts import check_expert_jobs, expert_targets
from ..init.fused import job_rows
from ..init.targets import architecture, assign_roles, is_transposed, linear_modules
from ..io.checkpoint import Checkpoint
from ..io.hashing import file_digest
from ..io.nf4_layout import HEADS
from ..io.output import OutputDir
from ..io.rewrite import Hashes
from ..io.tables import table_format
from ..io.tensorio import DTYPE_FLAGS, FLOAT_DTYPES, read_tensor
from ..manifests import (
    ADAPTER_DIR,
    DECOMPOSE_MANIFEST,
    FROZEN,
    NO_OFFSET,
    ORIGINAL,
    RESIDUAL,
    RESIDUAL_DIR,
    decompose_identity,
)
from ..options import DecomposeOptions, TaskOptions
from .context import DecomposeRun
from .factors import factors_only, serve
from .residual_checkpoint import write_residual


def decompose(
    model: str | os.PathLike,
    out: str | os.PathLike,
    options: DecomposeOptions | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    **settings,
) -> dict:
    """Write OUT/residual (HF model dir), OUT/adapter (PEFT LoRA) and, last, OUT/ailora.json.

    Launched by torchrun (`torchrun --nproc-per-node N -m ailora_tools.cli decompose ...`), each rank computes
    the factors of its share of the target matrices on its own device and rank 0 writes the same bytes as one
    process (`ailora_tools.distributed`).

    Host memory above the caller's baseline: at most 64 MiB + 16 × the largest target in float32, whatever
    the checkpoint size; GPT-OSS expert targets add twice their stored 3-D tensor (one layer's experts, read whole
    and copied for the residual). On CUDA, add a fixed cost for the CUDA context and its kernels (about 0.8–0.9 GB
    on an H100 with torch 2.11 + CUDA 13), paid once per process and not growing with the checkpoint.

    Args:
        model: local model directory or Hub repo id.
        out: output directory; must be empty unless `overwrite` or `resume`.
        options: a `DecomposeOptions` (every field documented there); `settings` replace its fields by name
            (`decompose(model, out, method="pissa", rank=32)`). The method is a registered init method
            (`ailora_tools.init.METHODS`): "ailora" (query principal, value minor), "pissa", "milora", "lora",
            "lora-da", "corda", "lora-ga" or "eva" (the last four calibrate on `data`; eva's ranks differ by module,
            recorded as `rank_pattern`), or PEFT's data-free "olora", "mica",
            "orthogonal" (docs/inits.md); minor components are always exact; every module's random draw is seeded by
            (seed, name);
            `no_residual` writes only OUT/adapter and the manifest, for training on the ORIGINAL weights with
            s·B0·A0 subtracted inside the adapter (`training.exact_mode`); `no_offset` also writes only the adapter,
            for training on the original weights as they are (the LoRA-DA authors' setting: step 0 is the model +
            s·B0·A0; the adapter applies to the original like a plain LoRA); `data`, `samples`, `max_length`, with
            `task` and the column options, are calibration settings for methods that need data (lora-da).
            With `dora`, a DoRA adapter (`use_dora: true`) whose magnitude vectors are the row norms of
            W_base + s·B0·A0 (`init.dora`), W_base the residual as stored (the original for plain LoRA), so step 0
            reproduces the model; not with `no_residual` for methods that offset the base.
        overwrite: replace a non-empty `out` (see `OutputDir`).
        resume: finish an interrupted run in `out` (see `OutputDir`).
        progress: show a tqdm bar.

    Returns:
        The run's summary (settings, paths, worst reconstruction error, seconds); on ranks ≥ 1 of a torchrun
        launch only {"worker": its rank, "computed", "seconds"}.

    Raises:
        AiloraError: (a subclass) on bad input, before anything is written.

    Example:
        >>> decompose("Qwen/Qwen2.5-0.5B", "out", rank=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    o = DecomposeOptions.build(options, **settings)
    init = get_method(o.method)
    _check_options(o, init)
    use_local_gpu(o.device)
    ckpt = Checkpoint.open(model, revision=o.revision, allow_pickle=o.allow_pickle, scratch=Path(out).absolute().parent)
    jobs = plan(ckpt, init, o.targets, o.roles, o.rank)
    check_expert_jobs(
        ckpt.config,
        [j.module for j in jobs],
        dora=o.dora,
        quantize=o.quantize,
        needs_data=init.needs_data,
        no_residual=o.no_residual,
        offsets_base=init.offsets_base,
    )
    quant = _quantization(ckpt, jobs, o) if o.quantize else None
    params = Settings(o.rank, lora_scale(o.rank, o.lora_alpha, o.rslora), o.svd, o.niter, o.oversample, o.seed)
    init.check_settings(params)
    recorded = _recorded(o, init, ckpt, jobs, params, quant)
    # before the output is claimed: data-aware methods calibrate here, and fail here on data or architecture
    context = init.prepare(
        ckpt,
        jobs,
        params,
        data=o.data,
        samples=o.samples,
        max_length=o.max_length,
        task=o,
        device=o.device,
        progress=progress and not is_worker(),
    )
    run = DecomposeRun(ckpt, tuple(jobs), init, params, context, o.device, progress)
    if is_worker():
        return {
            "worker": int(os.environ["RANK"]),
            "seconds": round(time.perf_counter() - started, 3),
            "computed": serve(run),
        }
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=recorded) as od:
        summary = _write(run, od, o, recorded, quant)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _check_options(o: DecomposeOptions, init: InitMethod) -> None:
    """Refuse calibration settings the method does not use or lacks, and a CUDA device that is not there."""
    if init.needs_data and o.data is None:
        raise OptionError(f"--method {o.method}: needs calibration samples; pass --data FILE.jsonl")
    if o.data is not None and not init.needs_data:
        users = ", ".join(m for m, i in METHODS.items() if i.needs_data)
        raise OptionError(f"--data: --method {o.method} does not use data (only {users} do); drop --data")
    if o.data is not None:
        table_format(o.data, "--data")  # there and readable now; its rows, for the task, in the method's `prepare`
    if o.data is None and DecomposeOptions.build(o, **TaskOptions.defaults()) != o:
        raise OptionError(
            f"--task and the column options: for calibration data (--data, lora-da); --method {o.method} "
            "reads none; drop them"
        )
    if o.device not in ("auto", "cpu"):  # a CUDA device is checked now (this loads torch); auto and cpu cannot fail
        from ..devices import resolve_device

        resolve_device(o.device)


def _recorded(
    o: DecomposeOptions, init: InitMethod, ckpt: Checkpoint, jobs: list[Job], params: Settings, quant: dict | None
) -> dict:
    """The run's settings as the manifest records them (and `--resume` compares)."""
    settings = {
        "tool": __version__,
        "method": o.method,
        "rank": o.rank,
        "alpha": o.lora_alpha,
        "rslora": o.rslora,
        "scale": params.scale,
        "targets": list(o.targets),
        "roles": {j.module: j.role for j in jobs},
        "svd": {"mode": o.svd, "niter": o.niter, "oversample": o.oversample, "seed": o.seed, "device": o.device},
        "residual_dtype": o.residual_dtype,
        "source": ckpt.describe(),
        "adapter_base": RESIDUAL if (init.offsets_base or quant) and not (o.no_residual or o.no_offset) else ORIGINAL,
    }
    if quant:
        settings["quantize"] = {k: v for k, v in quant.items() if k != "only"}
    if o.no_offset and init.offsets_base or not init.subtracts_product:  # the base stays as it is and training
        settings[NO_OFFSET] = True  # does not subtract s·B0·A0 (MiCA, orthogonal: PEFT's start, W + s·B0·A0)
    if init.frozen:
        settings[FROZEN] = list(init.frozen)
    if o.dora:
        settings["dora"] = True
    if o.data is not None:
        settings["data"] = {
            "path": str(Path(o.data).absolute()),
            "digest": file_digest(o.data),
            "samples": o.samples,
            "max_length": o.max_length,
            "task": task_of(o.task, ckpt.config),
        }
    return settings


def _write(run: DecomposeRun, od: OutputDir, o: DecomposeOptions, settings: dict, quant: dict | None) -> dict:
    """The residual (when the adapter applies to it), the adapter and, last, the manifest; return the summary."""
    ckpt, hashes = run.ckpt, Hashes()
    on_residual = settings["adapter_base"] == RESIDUAL
    if on_residual:
        results, ran_on = write_residual(run, od, hashes, DTYPE_FLAGS.get(o.residual_dtype), quant)
        base = str(od.path / RESIDUAL_DIR)
    else:  # the base stays as it is: only the factors, but the manifest still names the source
        for name, p in ckpt.files().items():
            hashes.add("source", name, p)
        results, ran_on = factors_only(run)
        base = ckpt.name_or_path
    factors, stats = {m: f for m, (f, _) in results.items()}, {m: s for m, (_, s) in results.items()}
    for p in _write_adapter(run, od, o, base, factors, on_residual):
        hashes.add("output", f"{ADAPTER_DIR}/{p.name}", p)
    summary = {
        **{k: v for k, v in settings.items() if k != "roles"},
        "output": str(od.path),
        "residual": base if on_residual else None,
        "adapter": str(od.path / ADAPTER_DIR),
        "modules": len(run.jobs),
        "worst_recon_rel_fro": max((s.get("recon_rel_fro", 0.0) for s in stats.values()), default=0.0),
        "worst_recon_max_abs": max((s.get("recon_max_abs", 0.0) for s in stats.values()), default=0.0),
    }
    if quant:
        from .quantized import error_table

        summary["quant_error"] = error_table(stats, o.method, o.loftq_iters)
    od.write_manifest(
        DECOMPOSE_MANIFEST,
        {
            **settings,
            "svd": {**settings["svd"], "ran_on": ran_on},
            "options": asdict(o),
            "files": hashes.result(),
            "modules": dict(sorted(stats.items())),
            "applies_to": decompose_identity(
                stats,
                original=ckpt.name_or_path,
                residual=RESIDUAL_DIR if on_residual else None,
                kind=settings["adapter_base"],
            ),
        },
    )
    return summary


def _write_adapter(
    run: DecomposeRun, od: OutputDir, o: DecomposeOptions, base: str, factors: dict, on_residual: bool
) -> list:
    """OUT/adapter: the initial factors as a PEFT LoRA (DoRA with `o.dora`) on `base`; returns the files written."""
    from ..io.peft_adapter import lora_config, with_ranks, write_adapter

    jobs, ckpt = run.jobs, run.ckpt
    head = {n: read_tensor(ckpt.shard(ckpt.tensors[n].file), n) for n in head_tensors(ckpt.tensors, ckpt.config)}
    config = lora_config(
        rank=o.rank,
        alpha=o.lora_alpha,
        targets=[j.module.rsplit(".", 1)[-1] for j in jobs],
        rslora=o.rslora,
        base=base,
        task_type=peft_task_type(ckpt.config),
        fan_in_fan_out=any(j.transposed for j in jobs),
        dora=o.dora,
        modules_to_save=sorted({n.split(".", 1)[0] for n in head}),
    )  # PEFT loads the head
    config, factors = with_ranks(config, factors)  # ranks by module (EVA's): rank_pattern, alpha_pattern
    magnitudes = None
    if o.dora:  # from the base as PEFT will load it: the residual as written, or the original
        from ..init.dora import magnitudes_of

        on = Checkpoint.open(base) if on_residual else run.ckpt
        magnitudes = magnitudes_of(
            on,
            {j.module: j.tensor.name for j in jobs},
            factors,
            run.params.scale,
            transposed={j.module: j.transposed for j in jobs},
        )
    return write_adapter(od.path / ADAPTER_DIR, config, factors, magnitudes=magnitudes, extra=head)


def plan(ckpt: Checkpoint, init: InitMethod, targets, overrides: dict[str, str], rank: int) -> list[Job]:
    """Every target matrix of the checkpoint with its role, in file order; validated for dtype and rank.

    Raises:
        TargetError, UnsupportedError, NumericsError: a target that matches nothing, cannot take its role, is
            not a float matrix, or is too small for `rank`.
    """
    arch = architecture(ckpt.config)
    parts = expert_slices(ckpt.tensors, ckpt.config)  # GPT-OSS: each expert's matrix in a stored 3-D tensor
    weights = {**linear_modules(ckpt.tensors), **{m: ckpt.tensors[p.tensor] for m, p in parts.items()}}
    targets = expert_targets(ckpt.config, list(targets), list(weights), ckpt.tensors)  # fused names: every expert
    roles = assign_roles(init, targets, list(weights), arch, dict(overrides), config=ckpt.config)
    jobs = []
    for m in sorted(roles, key=lambda m: (weights[m].file, weights[m].begin)):
        job = Job(m, weights[m], roles[m], is_transposed(m, arch), part=parts.get(m))
        _check_target(job, rank)
        jobs.append(replace(job, rows=job_rows(m, roles[m], job.shape, arch, ckpt.config, rank)))
    return jobs


def _check_target(job: Job, rank: int) -> None:
    t, what = job.tensor, repr(job.module if job.part else job.tensor.name)
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedError(
            f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; decompose supports "
            f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)"
        )
    if rank >= min(job.shape):
        raise NumericsError(
            f"--rank {rank}: {what} is {job.shape[0]}x{job.shape[1]}, so rank must be below {min(job.shape)}"
        )


def _quantization(ckpt: Checkpoint, jobs: list[Job], o: DecomposeOptions) -> dict:
    """What `--quantize` writes: the settings recorded, and `only`, the weights quantised without factors
    (`--quantize-all`: every other linear weight but the model heads), by tensor name.

    Raises:
        UnsupportedError: a Conv1D model (weights stored transposed).
    """
    arch = architecture(ckpt.config)
    if arch.transposed:
        raise UnsupportedError(
            f"--quantize {o.quantize}: {ckpt.source} stores its linear weights transposed "
            f"(Conv1D: {', '.join(arch.transposed)}), which bitsandbytes does not load "
            "pre-quantised; decompose without --quantize"
        )
    linear, targets = linear_modules(ckpt.tensors), {j.module for j in jobs}
    only = sorted(
        t.name
        for m, t in linear.items()
        if o.quantize_all and m not in targets and t.dtype in FLOAT_DTYPES and m.rsplit(".", 1)[-1] not in HEADS
    )
    return {"type": o.quantize, "all": o.quantize_all, "loftq_iters": o.loftq_iters, "double_quant": True, "only": only}
