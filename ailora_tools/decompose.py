"""Stream a checkpoint into a residual base plus an initial adapter (AILoRA, PiSSA, MiLoRA, LoRA).

Shard by shard: the shard's bytes are copied kernel-side (next shard's copy overlaps this shard's
SVDs), each target's byte range is overwritten with W_res = W − s·B0·A0, the shard is published by
rename and recorded in the journal. Peak memory is a few copies of the largest target matrix.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import Checkpoint
from .errors import NumericsError, TargetError, UnsupportedError
from .methods import METHODS, factors_from_triplets, kaiming_factors, lora_scale
from .output import OutputDir
from .peft_format import lora_config, task_type, write_adapter
from .svd import generator_for, resolve_device, triplets
from .targets import architecture, assign_roles, is_transposed, linear_modules
from .tensorio import DTYPE_NAMES, FLOAT_DTYPES, ShardHeader, copy_ranges, layout, read_tensor, sha256_file, tensor_bytes

MANIFEST_NAME = "ailora.json"
RESIDUAL_DIR, ADAPTER_DIR, WORK_DIR = "residual", "adapter", ".work"
DTYPE_FLAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass
class _ShardJob:
    header: ShardHeader
    fd: int
    offsets: dict[str, int]
    copied: Future


def decompose(
    model: str | os.PathLike, out: str | os.PathLike, *, method: str = "ailora", rank: int = 16,
    alpha: float | None = None, rslora: bool = False, targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    roles: dict[str, str] | None = None, svd: str = "randomized", niter: int = 4, oversample: int = 16,
    seed: int = 0, device: str = "auto", residual_dtype: str | None = None, revision: str | None = None,
    overwrite: bool = False, resume: bool = False, progress: bool = True,
) -> dict:
    """Write OUT/residual (HF model dir), OUT/adapter (PEFT LoRA) and OUT/ailora.json.

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
        revision: Hub revision. overwrite, resume: see `OutputDir`. progress: show a tqdm bar.

    Returns:
        The summary (also in the manifest without per-module detail).

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
    alpha = float(rank if alpha is None else alpha)
    dev = resolve_device(device)
    ckpt = Checkpoint.open(model, revision=revision)
    arch = architecture(ckpt.config)
    weights = linear_modules(ckpt.tensors)
    module_roles = assign_roles(METHODS[method], list(targets), list(weights), arch, dict(roles or {}))
    _validate(ckpt, weights, module_roles, rank)
    scale = lora_scale(rank, alpha, rslora)
    settings = {
        "tool": __version__, "method": method, "rank": rank, "alpha": alpha, "rslora": rslora, "scale": scale,
        "targets": list(targets), "roles": module_roles,
        "svd": {"mode": svd, "niter": niter, "oversample": oversample, "seed": seed, "device": str(dev)},
        "residual_dtype": residual_dtype, "source": ckpt.describe(),
    }
    fan_in_fan_out = any(is_transposed(m, arch) for m in module_roles)
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, resume=resume, settings=settings) as od:
        run = _Run(ckpt, od, module_roles, weights, arch, rank, scale, settings, dev, progress)
        if METHODS[method] is None:
            factors = run.kaiming(seed)
        else:
            factors = run.residual(DTYPE_FLAGS.get(residual_dtype))
        adapter_base = ckpt.source if METHODS[method] is None else str(od.path / RESIDUAL_DIR)
        config = lora_config(rank=rank, alpha=alpha, targets=sorted({m.rsplit(".", 1)[-1] for m in module_roles}),
                             rslora=rslora, base=adapter_base, task_type=task_type(ckpt.config),
                             fan_in_fan_out=fan_in_fan_out)
        tmp = od.partial(ADAPTER_DIR)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_adapter(tmp, config, factors)
        shutil.rmtree(od.path / ADAPTER_DIR, ignore_errors=True)
        od.publish(ADAPTER_DIR)
        summary = run.finish(time.perf_counter() - started)
    return summary


def _validate(ckpt: Checkpoint, weights: dict, module_roles: dict, rank: int) -> None:
    for m in module_roles:
        t = weights[m]
        if t.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; decompose supports "
                f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)"
            )
        if rank >= min(t.shape):
            raise NumericsError(f"--rank {rank}: {t.name!r} is {t.shape[0]}x{t.shape[1]}, so rank must be below "
                                f"{min(t.shape)}")


class _Run:
    """One decompose run's state: the plan, the output directory, per-module stats."""

    def __init__(self, ckpt, od: OutputDir, roles, weights, arch, rank, scale, settings, dev, progress):
        self.ckpt, self.od, self.roles, self.weights, self.arch = ckpt, od, roles, weights, arch
        self.rank, self.scale, self.settings, self.dev, self.progress = rank, scale, settings, dev, progress
        self.stats: dict[str, dict] = {}
        self.hashes = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self.hash_jobs: dict[tuple[str, str], Future] = {}

    def _by_shard(self) -> dict[str, list[str]]:
        plan: dict[str, list[str]] = {s: [] for s in self.ckpt.shards}
        for m in sorted(self.roles, key=lambda m: (self.weights[m].file, self.weights[m].begin)):
            plan[self.weights[m].file].append(m)
        return plan

    def _hash(self, kind: str, rel: str, path: Path) -> None:
        self.hash_jobs[(kind, rel)] = self.hashes.submit(sha256_file, path)

    def kaiming(self, seed: int) -> dict:
        """Plain LoRA: no residual, A0 Kaiming-uniform, B0 = 0."""
        return {m: kaiming_factors(self.weights[m].shape[::-1] if is_transposed(m, self.arch) else self.weights[m].shape,
                                   self.rank, generator_for(seed, m, torch.device("cpu")))
                for m in self.roles}

    def residual(self, out_dtype: str | None) -> dict:
        """Write every shard of OUT/residual, return the initial factors of every module."""
        od, plan = self.od, self._by_shard()
        for name in self.ckpt.extra_files:
            self._copy_small(self.ckpt.root / name, f"{RESIDUAL_DIR}/{name}")
        copier = ThreadPoolExecutor(1, thread_name_prefix="copy")
        todo = [s for s in self.ckpt.shards if not self._reuse(s, plan[s])]
        jobs: dict[str, _ShardJob] = {}
        bar = tqdm(total=sum(len(plan[s]) for s in todo), unit="matrix", disable=not self.progress)
        try:
            for i, shard in enumerate(todo):
                for s in todo[i:i + 2]:  # this shard and the next: the next one's copy overlaps our compute
                    if s not in jobs:
                        jobs[s] = self._start(s, {m: out_dtype for m in plan[s]} if out_dtype else {}, copier)
                bar.set_description(shard)
                job = jobs.pop(shard)
                self._hash("source", shard, job.header.path)
                factors = {}
                with open(job.header.path, "rb") as src:
                    for m in plan[shard]:
                        factors[m] = self._one(m, job, src.fileno(), out_dtype)
                        bar.update(1)
                job.copied.result()
                os.close(job.fd)
                final = od.publish(f"{RESIDUAL_DIR}/{shard}")
                self._hash("output", f"{RESIDUAL_DIR}/{shard}", final)
                self._save_factors(shard, factors)
                od.mark_done(shard, {"modules": {m: self.stats[m] for m in plan[shard]}})
        finally:
            bar.close()
            for job in jobs.values():
                job.copied.cancel()
                os.close(job.fd)
            copier.shutdown(wait=True)
        self._write_index(out_dtype)
        factors = {}
        for shard in self.ckpt.shards:
            if plan[shard]:
                loaded = load_file(str(od.path / WORK_DIR / f"{shard}.factors"))
                factors.update({m: (loaded[f"{m}.A"], loaded[f"{m}.B"]) for m in plan[shard]})
        return factors

    def _reuse(self, shard: str, modules: list[str]) -> bool:
        rec = self.od.finished(shard)
        final = self.od.path / RESIDUAL_DIR / shard
        factors = self.od.path / WORK_DIR / f"{shard}.factors"
        if rec is None or not final.is_file() or (modules and not factors.is_file()):
            return False
        self.stats.update(rec["modules"])
        self._hash("source", shard, self.ckpt.headers[shard].path)
        self._hash("output", f"{RESIDUAL_DIR}/{shard}", final)
        return True

    def _start(self, shard: str, dtypes: dict[str, str], copier: ThreadPoolExecutor) -> _ShardJob:
        header = self.ckpt.headers[shard]
        head, offsets, copies = layout(header, {self.weights[m].name: d for m, d in dtypes.items()})
        fd = os.open(self.od.partial(f"{RESIDUAL_DIR}/{shard}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return _ShardJob(header, fd, offsets, copier.submit(copy_ranges, header.path, fd, head, copies))

    def _one(self, module: str, job: _ShardJob, src_fd: int, out_dtype: str | None):
        info = self.weights[module]
        W = read_tensor(job.header, info.name, src_fd)
        if not bool(torch.isfinite(W).all()):
            raise NumericsError(f"{info.file}: tensor {info.name!r} holds NaN or Inf; fix the checkpoint first")
        transposed = is_transposed(module, self.arch)
        W64 = (W.T if transposed else W).to(self.dev, torch.float64)
        svd = self.settings["svd"]
        t = triplets(W64, self.rank, self.roles[module], mode=svd["mode"], niter=svd["niter"],
                     oversample=svd["oversample"], generator=generator_for(svd["seed"], module, self.dev))
        A0, B0 = factors_from_triplets(t, self.scale)
        delta = self.scale * (B0.double() @ A0.double())
        stored = (W64 - delta).to(FLOAT_DTYPES[out_dtype or info.dtype])
        err = stored.double() + delta - W64
        self.stats[module] = {
            "tensor": info.name, "shard": info.file, "shape": list(info.shape), "dtype": info.dtype,
            "role": self.roles[module], "sigma_max": t.sigma_max,
            "sigma_edge": float(t.S[-1] if self.roles[module] == "principal" else t.S[0]),
            "energy_fraction": t.energy_fraction, "deficient_directions": t.deficient,
            "recon_max_abs": float(err.abs().max()),
            "recon_rel_fro": float(err.norm() / W64.norm().clamp(min=1e-300)),
        }
        job.copied.result()
        data = tensor_bytes(stored.T if transposed else stored)
        if os.pwrite(job.fd, data, job.offsets[info.name]) != len(data):
            raise OSError(f"short write of {info.name!r}")
        return A0.cpu(), B0.cpu()

    def _save_factors(self, shard: str, factors: dict) -> None:
        if not factors:
            return
        tensors = {f"{m}.{k}": v for m, (A, B) in factors.items() for k, v in (("A", A), ("B", B))}
        rel = f"{WORK_DIR}/{shard}.factors"
        save_file(tensors, str(self.od.partial(rel)))
        self.od.publish(rel)

    def _copy_small(self, src: Path, rel: str) -> None:
        shutil.copyfile(src, self.od.partial(rel))
        self._hash("source", src.name, src)
        self._hash("output", rel, self.od.publish(rel))

    def _write_index(self, out_dtype: str | None) -> None:
        index = self.ckpt.index_file
        if index is None:
            return
        rel = f"{RESIDUAL_DIR}/{index}"
        if out_dtype is None:
            return self._copy_small(self.ckpt.root / index, rel)
        doc = json.loads((self.ckpt.root / index).read_text())
        doc.setdefault("metadata", {})["total_size"] = sum(
            (self.od.path / RESIDUAL_DIR / s).stat().st_size - self.ckpt.headers[s].data_start for s in self.ckpt.shards)
        with self.od.open_atomic(rel, "w") as f:
            json.dump(doc, f, indent=2)
        self._hash("source", index, self.ckpt.root / index)
        self._hash("output", rel, self.od.path / rel)

    def finish(self, seconds: float) -> dict:
        """Hash the adapter, write the manifest last, and return the summary."""
        od = self.od
        for name in sorted(os.listdir(od.path / ADAPTER_DIR)):
            self._hash("output", f"{ADAPTER_DIR}/{name}", od.path / ADAPTER_DIR / name)
        files: dict[str, dict[str, str]] = {"source": {}, "output": {}}
        for (kind, rel), fut in sorted(self.hash_jobs.items()):
            files[kind][rel] = fut.result()
        self.hashes.shutdown()
        worst = max((s["recon_rel_fro"] for s in self.stats.values()), default=0.0)
        summary = {
            **{k: v for k, v in self.settings.items() if k != "roles"},
            "output": str(od.path), "residual": str(od.path / RESIDUAL_DIR) if self.stats else None,
            "adapter": str(od.path / ADAPTER_DIR), "modules": len(self.roles),
            "worst_recon_rel_fro": worst,
            "worst_recon_max_abs": max((s["recon_max_abs"] for s in self.stats.values()), default=0.0),
            "seconds": round(seconds, 3),
        }
        manifest = {**self.settings, "files": files,
                    "modules": {m: self.stats.get(m, {"role": r}) for m, r in sorted(self.roles.items())}}
        with od.open_atomic(MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        od.finish()
        shutil.rmtree(od.path / WORK_DIR, ignore_errors=True)
        return summary
