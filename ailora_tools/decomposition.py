"""Stream a checkpoint into a residual base plus an initial adapter (AILoRA, PiSSA, MiLoRA, LoRA).

Everything is validated before anything is written. Each target W is then read alone and replaced in the
copied shard by its residual (`residual.residual_target`). This module loads torch only when the first
target is read: by then the first shards are being copied and hashed, so the 1.2 s torch import overlaps
with I/O instead of preceding it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint
from .errors import NumericsError, TargetError, UnsupportedError
from .methods import METHODS, kaiming_factors, lora_scale
from .output import OutputDir
from .rewrite import Hashes, rewrite_checkpoint
from .targets import architecture, assign_roles, is_transposed, linear_modules
from .tensorio import DTYPE_FLAGS, FLOAT_DTYPES, TensorInfo

MANIFEST_NAME = "ailora.json"
RESIDUAL_DIR, ADAPTER_DIR, WORK_DIR = "residual", "adapter", ".work"


def decompose(
    model: str | os.PathLike, out: str | os.PathLike, *, method: str = "ailora", rank: int = 16,
    alpha: float | None = None, rslora: bool = False, targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    roles: dict[str, str] | None = None, svd: str = "randomized", niter: int = 4, oversample: int = 8,
    seed: int = 0, device: str = "auto", residual_dtype: str | None = None, revision: str | None = None,
    allow_pickle: bool = False, no_residual: bool = False, overwrite: bool = False, resume: bool = False,
    progress: bool = True,
) -> dict:
    """Write OUT/residual (HF model dir), OUT/adapter (PEFT LoRA) and, last, OUT/ailora.json.

    Args:
        model: local model directory or Hub repo id.
        out: output directory; must be empty unless `overwrite` or `resume`.
        method: "ailora" (query principal, value minor), "pissa", "milora" or "lora".
        rank, alpha, rslora: LoRA rank, alpha (default: rank) and rsLoRA scaling.
        targets: module-name suffixes (architecture aliases such as BERT's query/value resolved).
        roles: suffix -> "principal" | "minor", overriding the method's roles.
        svd: "exact" or "randomized" (principal components only; minor ones are always exact).
        niter, oversample, seed: randomized SVD settings; every module's draw is seeded by (seed, name).
        device: "auto", "cpu", "cuda" or "cuda:N" for the SVDs.
        residual_dtype: "float32", "float16" or "bfloat16" for the residual targets (default: as stored).
        revision: Hub revision. allow_pickle: accept .bin/.pt weights (see `Checkpoint.open`).
        no_residual: write only OUT/adapter and the manifest, for training on the ORIGINAL weights with
            s·B0·A0 subtracted inside the adapter (`initial_offset`); the manifest's `adapter_base` says which.
        overwrite, resume: see `OutputDir`. progress: show a tqdm bar.

    Returns:
        The run's summary (settings, paths, worst reconstruction error, seconds).

    Raises:
        AiloraError subclasses on bad input, before anything is written.

    Example:
        >>> decompose("Qwen/Qwen2.5-0.5B", "out", rank=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise TargetError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if svd not in ("exact", "randomized"):
        raise TargetError(f"--svd {svd!r}: choose exact or randomized")
    if residual_dtype is not None and residual_dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"--residual-dtype {residual_dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    if rank < 1:
        raise NumericsError(f"--rank {rank}: must be at least 1")
    if no_residual and residual_dtype is not None:
        raise TargetError("--residual-dtype: --no-residual writes no residual; drop one of the two")
    alpha = float(rank if alpha is None else alpha)
    if device not in ("auto", "cpu"):  # a CUDA device is checked now (this loads torch); auto and cpu cannot fail
        from .svd import resolve_device

        resolve_device(device)
    ckpt = Checkpoint.open(model, revision=revision, allow_pickle=allow_pickle, scratch=Path(out).absolute().parent)
    arch = architecture(ckpt.config)
    weights = linear_modules(ckpt.tensors)
    roles = assign_roles(METHODS[method], list(targets), list(weights), arch, dict(roles or {}))
    for m in roles:
        _check_target(weights[m], rank)
    scale = lora_scale(rank, alpha, rslora)
    settings = {
        "tool": __version__, "method": method, "rank": rank, "alpha": alpha, "rslora": rslora, "scale": scale,
        "targets": list(targets), "roles": roles,
        "svd": {"mode": svd, "niter": niter, "oversample": oversample, "seed": seed, "device": device},
        "residual_dtype": residual_dtype, "source": ckpt.describe(),
        # what the adapter applies to: "original" (no residual written) or "residual" (OUT/residual)
        "adapter_base": "original" if no_residual or METHODS[method] is None else "residual",
    }
    hashes = Hashes()
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=settings) as od:
        if METHODS[method] is None:  # plain LoRA: no residual, but the manifest still names the source
            stats = {}
            for p in ckpt.files():
                hashes.add("source", p.name, p)
            from .svd import generator_for

            factors = {m: kaiming_factors(_shape(weights[m], m, arch), rank, generator_for(seed, m, "cpu")) for m in roles}
        elif no_residual:  # SVDs only: train subtracts s·B0·A0 from the original weights itself
            from .initial_factors import initial_factors

            for p in ckpt.files():
                hashes.add("source", p.name, p)
            stats, factors = initial_factors(ckpt, roles, weights, transposed={m: is_transposed(m, arch) for m in roles},
                                             rank=rank, scale=scale, svd=settings["svd"], progress=progress)
        else:
            stats, factors = _residual(ckpt, od, hashes, roles, weights, arch, settings,
                                       DTYPE_FLAGS.get(residual_dtype), progress)
        from .peft_format import lora_config, task_type, write_adapter

        base = ckpt.source if settings["adapter_base"] == "original" else str(od.path / RESIDUAL_DIR)
        config = lora_config(rank=rank, alpha=alpha, targets=[m.rsplit(".", 1)[-1] for m in roles], rslora=rslora,
                             base=base, task_type=task_type(ckpt.config),
                             fan_in_fan_out=any(is_transposed(m, arch) for m in roles))
        for p in write_adapter(od.path / ADAPTER_DIR, config, factors):
            hashes.add("output", f"{ADAPTER_DIR}/{p.name}", p)
        summary = {
            **{k: v for k, v in settings.items() if k != "roles"},
            "output": str(od.path), "residual": str(od.path / RESIDUAL_DIR) if settings["adapter_base"] == "residual" else None,
            "adapter": str(od.path / ADAPTER_DIR), "modules": len(roles),
            "worst_recon_rel_fro": max((s.get("recon_rel_fro", 0.0) for s in stats.values()), default=0.0),
            "worst_recon_max_abs": max((s.get("recon_max_abs", 0.0) for s in stats.values()), default=0.0),
        }
        manifest = {**settings, "files": hashes.result(),
                    "modules": {m: stats.get(m, {"role": r}) for m, r in sorted(roles.items())}}
        od.write_manifest(MANIFEST_NAME, manifest)
        shutil.rmtree(od.path / WORK_DIR, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _shape(info: TensorInfo, module: str, arch) -> tuple[int, int]:
    return info.shape[::-1] if is_transposed(module, arch) else info.shape


def _check_target(t: TensorInfo, rank: int) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; decompose supports "
                               f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)")
    if rank >= min(t.shape):
        raise NumericsError(f"--rank {rank}: {t.name!r} is {t.shape[0]}x{t.shape[1]}, so rank must be below "
                            f"{min(t.shape)}")


def _residual(ckpt, od, hashes, roles, weights, arch, settings, out_dtype, progress):
    """Rewrite the checkpoint with residual targets; return per-module stats and initial factors."""
    module_of = {weights[m].name: m for m in roles}
    plan: dict[str, list[str]] = {}
    for m in sorted(roles, key=lambda m: (weights[m].file, weights[m].begin)):
        plan.setdefault(weights[m].file, []).append(weights[m].name)
    stats: dict[str, dict] = {}
    factors: dict[str, tuple] = {}
    svd = settings["svd"]

    def compute(info: TensorInfo, W):
        from .residual import residual_target  # torch loads here, at the first target, while shards copy
        from .svd import resolve_device

        if "ran_on" not in svd:  # "auto" is resolved once torch has loaded; the manifest records the result
            svd["ran_on"] = str(resolve_device(svd["device"]))
        m = module_of[info.name]
        stored, factors[m], stats[m] = residual_target(
            info, W, module=m, role=roles[m], transposed=is_transposed(m, arch), rank=settings["rank"],
            scale=settings["scale"], svd=svd, device=resolve_device(svd["ran_on"]), out_dtype=out_dtype)
        return stored

    def on_shard(shard: str) -> dict:
        mods = [module_of[n] for n in plan.get(shard, [])]
        if mods:
            from safetensors.torch import save_file

            rel = f"{WORK_DIR}/{shard}.factors"
            save_file({f"{m}.{k}": v for m in mods for k, v in zip("AB", factors[m])}, str(od.partial(rel)))
            od.publish(rel)
        return {"modules": {m: stats[m] for m in mods}}

    def on_reuse(shard: str, record: dict) -> bool:
        mods = [module_of[n] for n in plan.get(shard, [])]
        path = od.path / WORK_DIR / f"{shard}.factors"
        if mods and not path.is_file():
            return False
        from safetensors.torch import load_file

        loaded = load_file(str(path)) if mods else {}
        factors.update({m: (loaded[f"{m}.A"], loaded[f"{m}.B"]) for m in mods})
        stats.update(record["modules"])
        return True

    rewrite_checkpoint(ckpt, od, RESIDUAL_DIR, plan, compute, hashes=hashes, out_dtype=out_dtype,
                       on_shard=on_shard, on_reuse=on_reuse, progress=progress, desc="decompose")
    return stats, factors
