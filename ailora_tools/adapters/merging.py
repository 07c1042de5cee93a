"""Merge a LoRA adapter into full weights, streaming: W' = W + s·B·A computed in float32.

A DoRA adapter merges as PEFT's `merge_and_unload` does: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ per output
row (`dora.merged_weight`). Only the adapted weights are decoded; every other byte of the base is copied
unchanged. Works for
(residual, trained adapter), (original, converted LoRA) and any PEFT LoRA (rsLoRA, rank_pattern,
alpha_pattern, fan_in_fan_out). Adapter modules are found in the base whatever base model prefix either
side's names carry (`model_names`). An adapter's `modules_to_save` (a classification head) is written
into the merged model: over the base's tensors where it has them, as new tensors where it has none; and
config.json gets the class and labels the training manifest records, so that
AutoModelForSequenceClassification loads the result. A bare base checkpoint (BertModel: `encoder...`) that gets
a head has its tensors renamed with the base model prefix (`bert.encoder...`), as the task class saves itself:
transformers before v5 refuses a checkpoint that mixes bare base tensors and a head. Launched by torchrun,
rank 0 merges alone: a merged matrix costs one rank-r product, less than sending it between processes would;
the other ranks check the input and end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..architectures import CLASSIFY, base_model_prefix, match, saved_task
from ..distributed import is_worker
from ..errors import TargetError, UnsupportedError
from ..experts import ExpertSlice, expert_slices
from ..init.dora import merged_weight
from ..io.checkpoint import Checkpoint
from ..io.fingerprints import fingerprints
from ..io.output import OutputDir
from ..io.peft_adapter import Adapter, read_adapter
from ..io.rewrite import Hashes, Replaced, by_shard, rewrite_checkpoint
from ..io.tensorio import DTYPE_FLAGS, FLOAT_DTYPES, TensorInfo, torch_dtype
from ..manifests import MERGE_MANIFEST, base_of, check_base, task_record
from ..training.bitfit import is_bitfit, read_bitfit
from .nf4_residual import (
    PARTS,
    compute_dtype,
    float_view,
    quantized_weights,
    read_dequantized,
    rel_error,
    trained_on,
    trained_reference,
)


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Write OUT as a complete HF model directory with the adapter merged into the base.

    Args:
        base: model directory or Hub id the adapter applies to.
        adapter: PEFT LoRA adapter directory, or the output of `train --bitfit` (its biases and head are written).
        out: output model directory.
        dtype: float32, float16 or bfloat16 for the merged weights (default: as stored).
        revision: Hub revision of `base` (as for `decompose`).
        allow_pickle: accept .bin/.pt weights (loaded with `torch.load(weights_only=True)`).
        overwrite: replace a non-empty `out`.
        resume: finish an interrupted merge in `out`.
        progress: show a tqdm bar.
        force: merge although `base` is not the model the adapter's manifests record (a warning in the manifest).

    Returns:
        Summary: modules merged, largest |ΔW|, output path, seconds; on ranks ≥ 1 of a torchrun launch, which
        only check the input, {"worker": its rank, "computed": 0, "seconds"}.

    Raises:
        TargetError: the adapter names a module the base lacks, or its shapes do not fit; a head whose labels
            no manifest records, merged into a base that is no sequence-classification model.

    Example:
        >>> merge("out/residual", "trained", "merged")  # doctest: +SKIP
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    plan = _plan_merge(base, adapter, out, dtype=dtype, revision=revision, allow_pickle=allow_pickle, force=force)
    if is_worker():
        return {"worker": int(os.environ["RANK"]), "computed": 0, "seconds": round(time.perf_counter() - started, 3)}
    summary = _write_merged(plan, base, adapter, out, overwrite=overwrite, resume=resume, progress=progress)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


@dataclass
class MergePlan:
    """A checked merge, before anything is written: the per-tensor job, the head's new and renamed tensors, the
    merged config.json and the manifest's settings."""

    job: MergeJob
    added: dict
    renamed: dict
    config: dict
    settings: dict


def _plan_merge(base, adapter, out, *, dtype: str | None, revision, allow_pickle: bool, force: bool) -> MergePlan:
    """Read and check the adapter and the base (shapes, the base the manifests record, the head) for a merge."""
    lora = read_bitfit(adapter) if is_bitfit(adapter) else read_adapter(adapter, dora=True)  # BitFit: biases only
    ckpt = Checkpoint.open(base, revision=revision, allow_pickle=allow_pickle, scratch=Path(out).absolute().parent)
    packed = quantized_weights(ckpt.tensors)  # an NF4 residual: merged as the float model it dequantises to
    tensors = float_view(ckpt, DTYPE_FLAGS.get(dtype) or compute_dtype(ckpt)) if packed else ckpt.tensors
    weights = lora.check_fits(tensors, adapter=adapter, base=base, config=ckpt.config)
    quant = trained_on(adapter)  # trained on a quantised residual: every merged weight measured against W_trained
    warning = check_base(adapter, ckpt, flag="BASE", force=force)
    out_dtype = DTYPE_FLAGS.get(dtype)
    heads, added, renamed, config = _head(
        lora, ckpt, adapter, base, out_dtype or (tensors[next(iter(weights.values()))].dtype if weights else "F32")
    )
    modules_of: dict[str, list[str]] = {}
    for m, w in weights.items():
        modules_of.setdefault(w, []).append(m)
    parts = {m: p for m, p in expert_slices(tensors, ckpt.config).items() if m in weights}
    job = MergeJob(ckpt, tensors, lora, modules_of, parts, heads, packed, quant, out_dtype)
    settings = {
        "tool": __version__,
        "command": "merge",
        "base": ckpt.describe(),
        "adapter": str(adapter),
        "adapter_config": lora.config,
        "dtype": dtype,
        "base_samples": fingerprints(ckpt),
        "applies_to": base_of(adapter).block(),
        **({"warnings": [f"--force: {warning}"]} if warning else {}),
    }
    return MergePlan(job, added, renamed, _merged_config(config, dtype, bool(packed)), settings)


def _write_merged(plan: MergePlan, base, adapter, out, *, overwrite: bool, resume: bool, progress: bool) -> dict:
    """OUT: the base with every planned tensor rewritten, the rest copied; its manifest; the summary."""
    job, ckpt, hashes = plan.job, plan.job.ckpt, Hashes()
    packed, tensors = job.packed, job.tensors
    changed = plan.config != ckpt.config
    files = {"config.json": json.dumps(plan.config, indent=2, sort_keys=True).encode()} if changed else {}
    with OutputDir(out, inputs=[ckpt.root, adapter], overwrite=overwrite, resume=resume, settings=plan.settings) as od:
        done = rewrite_checkpoint(
            ckpt,
            od,
            "",
            job.plan(),
            job,
            hashes=hashes,
            out_dtype=job.out_dtype,
            added=plan.added,
            renamed=plan.renamed,
            files=files,
            progress=progress,
            desc="merge",
            parts={n: {n: (tensors[n].dtype, tensors[n].shape)} for n in packed},
            dropped={f"{n}.{k}" for n in packed for k in PARTS},
        )
        largest = [r["max_abs_delta"] for _, r in done.values() if "max_abs_delta" in r]
        summary = {
            "output": str(od.path),
            "base": str(base),
            "adapter": str(adapter),
            "modules": len(job.lora.factors),
            "max_abs_delta": max(largest, default=0.0),
            "head_tensors": sorted([*job.heads, *plan.added]),
            **_quantized_summary(job.quant, done),
        }
        od.write_manifest(MERGE_MANIFEST, {**plan.settings, "files": hashes.result(), "summary": summary})
    return summary


@dataclass
class MergeJob:
    """What every merged tensor needs: the base, the adapter, which weight is which modules', the expert slices
    (GPT-OSS), the head's tensors, the NF4-packed weights, the quantised run to measure against, and the output dtype.
    Called per tensor by `rewrite_checkpoint`."""

    ckpt: Checkpoint
    tensors: dict[str, TensorInfo]  # the base as float tensors (an NF4 residual's dequantised view)
    lora: Adapter
    modules_of: dict[str, list[str]]  # weight tensor -> adapter modules (several: the expert slices of one tensor)
    parts: dict[str, ExpertSlice]  # adapter module -> its slice of a stored fused expert parameter
    heads: dict[str, torch.Tensor]  # base tensor -> the adapter's head tensor replacing it
    packed: set[str]
    quant: tuple | None  # (QuantizedRun, trained adapter) for an adapter trained on a quantised residual
    out_dtype: str | None

    @property
    def measured(self) -> set[str]:
        run, trained = self.quant or (None, None)
        return (run.packed | {f"{m}.weight" for m in trained.factors}) if run else set()

    def plan(self) -> dict[str, list[str]]:
        """Shard -> the tensors rewritten, by offset; with --dtype every float tensor is cast, adapted or not."""
        special = set(self.modules_of) | set(self.heads) | self.packed | self.measured
        return by_shard(
            self.tensors,
            [
                name
                for name, info in self.tensors.items()
                if name in special
                or (self.out_dtype is not None and info.dtype in FLOAT_DTYPES and info.dtype != self.out_dtype)
            ],
        )

    def __call__(self, info: TensorInfo, W: torch.Tensor) -> Replaced:
        if info.name in self.packed:
            W = read_dequantized(self.ckpt, info.name).to(torch_dtype(self.tensors[info.name].dtype))
            info = self.tensors[info.name]
        new = self._merged(info, W)
        if self.quant and info.name in self.measured:
            new.record["trained_rel_fro_error"] = rel_error(new.tensor, trained_reference(*self.quant, info.name))
        return new

    def _merged(self, info: TensorInfo, W: torch.Tensor) -> Replaced:
        target = torch_dtype(self.out_dtype) if self.out_dtype else W.dtype
        if info.name in self.heads:
            return Replaced(self.heads[info.name].to(target))
        if info.name not in self.modules_of:
            return Replaced(W.to(target))
        lora, modules = self.lora, self.modules_of[info.name]
        if modules[0] in self.parts:
            return self._merged_slices(modules, W, target)
        module = modules[0]
        if module in lora.magnitudes:  # DoRA: m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (init.dora)
            merged = merged_weight(
                W,
                *lora.factors[module],
                lora.scale(module),
                lora.magnitudes[module],
                transposed=bool(lora.config.get("fan_in_fan_out")),
            )
            return Replaced(merged.to(target), record={"max_abs_delta": float((merged - W.double()).abs().max())})
        delta = lora.delta(module)
        return Replaced((W.float() + delta).to(target), record={"max_abs_delta": float(delta.abs().max())})

    def _merged_slices(self, modules: list[str], W: torch.Tensor, target: torch.dtype) -> Replaced:
        """A stored fused expert parameter (GPT-OSS) with the s·B·A of each of `modules` (its expert slices) added
        in float32."""
        merged, largest = W.to(torch.float32, copy=True), 0.0
        for module in modules:
            delta = self.lora.delta(module)
            self.parts[module].matrix(merged).add_(delta)
            largest = max(largest, float(delta.abs().max()))
        return Replaced(merged.to(target), record={"max_abs_delta": largest})


def _merged_config(config: dict, dtype: str | None, packed: bool) -> dict:
    """The merged model's config.json: --dtype recorded, no quantization_config for a dequantised NF4 residual."""
    if dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
    if packed:
        config.pop("quantization_config", None)
    return config


def _quantized_summary(quant, done: dict) -> dict:
    """‖W_merged − (dequant(Q) + s·B·A)‖ / ‖…‖ per weight (`nf4_residual`), for an adapter trained on an NF4
    residual."""
    if not quant:
        return {}
    errors = {
        n.removesuffix(".weight"): r["trained_rel_fro_error"]
        for n, (_, r) in done.items()
        if "trained_rel_fro_error" in r
    }
    return {
        "quantized_residual": str(quant[0].residual.root),
        "trained_errors": dict(sorted(errors.items())),
        "worst_trained_rel_fro_error": max(errors.values(), default=0.0),
    }


def _head(lora: Adapter, ckpt: Checkpoint, adapter, base, dtype: str) -> tuple[dict, dict, dict, dict]:
    """The adapter's modules_to_save tensors: those replacing base tensors (by the base's name) and those added (in
    `dtype`); the renaming that gives a bare base the base model prefix; and the base's config with the class and
    labels they belong to (a copy of it when there is no head)."""
    if not lora.extra:
        return {}, {}, {}, dict(ckpt.config)
    tensors = ckpt.tensors
    found = match(lora.extra, tensors, config=ckpt.config)
    replaced, added = {}, {}
    for name, t in lora.extra.items():
        if name not in found:
            added[name] = t.to(torch_dtype(dtype))
        elif tuple(tensors[found[name]].shape) != tuple(t.shape):
            info = tensors[found[name]]
            raise TargetError(
                f"{adapter}: modules_to_save tensor {name} is {tuple(t.shape)} but {info.name} in "
                f"{info.file} of the base {base} is {tuple(info.shape)}; pass the base this adapter was "
                "trained on"
            )
        else:
            replaced[found[name]] = t
    record = task_record(adapter) or {}
    if record.get("config"):
        prefix = base_model_prefix(ckpt.config)
        bare = prefix and not any(n.startswith(prefix + ".") for n in tensors)
        renamed = {n: f"{prefix}.{n}" for n in tensors} if bare else {}
        return replaced, added, renamed, {**ckpt.config, **record["config"]}
    if saved_task(ckpt.config) != CLASSIFY:
        raise TargetError(
            f"{adapter}: has modules_to_save {lora.config.get('modules_to_save')} but no "
            "ailora-train.json or ailora-convert.json recording their class and labels, and the base "
            f"{base} is no sequence-classification model; merge an adapter trained or converted by "
            "ailora-tools"
        )
    return replaced, added, {}, dict(ckpt.config)
