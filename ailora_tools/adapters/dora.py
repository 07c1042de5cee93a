"""DoRA adapters as a standard LoRA, streamed (`convert --dora exact|approximate`); the maths is `init.dora`'s.

Planning (`plan_dora`: the adapter, the base it was trained on, the initial product per module, the original model)
is apart from the two ways of writing: exact rewrites the base's adapted matrices (OUT/base) beside the LoRA
(OUT/adapter); approximate writes a LoRA on the original from each module's truncated SVD.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import match
from ..errors import OptionError
from ..init.dora import approximate_factors, exact_parts, merged_weight, oriented
from ..io.checkpoint import Checkpoint
from ..io.fingerprints import fingerprints, pick
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import Adapter, lora_config, read_adapter, write_adapter
from ..io.rewrite import Hashes, Replaced, by_shard, rewrite_checkpoint
from ..io.tensorio import DTYPE_FLAGS, read_tensor, torch_dtype
from ..manifests import (
    ADAPTER_DIR,
    CONVERT_MANIFEST,
    DORA_BASE_DIR,
    ORIGINAL,
    TRAIN_MANIFEST,
    BaseOf,
    base_problem_dir,
    check_base,
    check_base_dir,
    converted_identity,
    name_or_path,
    original_base_of,
    starts_offset,
    task_record,
)
from ..options import DORA_MODES, at_least, choice
from .lowrank import alpha_for, check_tolerance, config_scale, pad_to_rank
from .rules import vllm_max_lora_rank


@dataclass
class DoraPlan:
    """What both ways of converting a DoRA adapter read: the adapter, the base it was trained on and its weights per
    module, each module's initial product (a residual start), the original model, and the summary so far."""

    trained: Path
    adapter: Adapter
    initial: str | os.PathLike | None
    task: dict | None
    ckpt: Checkpoint  # the base it was trained on
    weights: dict[str, str]  # module -> weight tensor name in `ckpt`
    initial_of: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A0, B0, s0)
    original: str
    out_dtype: torch.dtype
    summary: dict

    @property
    def transposed(self) -> bool:
        return bool(self.adapter.config.get("fan_in_fan_out"))


def convert_dora(
    trained: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str,
    initial: str | os.PathLike | None = None,
    max_rank: int | None = None,
    tolerance: float | None = None,
    accept_error: bool = False,
    dtype: str = "float32",
    base: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Turn a trained DoRA adapter into a standard LoRA, streaming the base it was trained on.

    Args:
        trained: the DoRA adapter (ours, or PEFT's own `use_dora=True` adapter).
        out: output directory. `mode="exact"` writes OUT/base (the base with each adapted matrix W replaced by
            D·W, every other byte copied) and OUT/adapter (the LoRA (D·B, A), rank r, for OUT/base).
            `mode="approximate"` writes OUT as a LoRA on the ORIGINAL model (alpha = r, scale folded into B).
        initial: the initial adapter (default: as the training manifest names; none for a plain DoRA).
        max_rank, tolerance: approximate only; the rank to keep, and/or the largest relative Frobenius error per
            module (the smallest rank that meets it is kept). A module above `tolerance` fails the run unless
            `accept_error`.
        dtype: float32, float16 or bfloat16 for the saved factors.
        base: the original model recorded in the approximate LoRA's config (default: from the manifests); one
            that contradicts the recorded original is refused.

    Returns:
        Summary: mode, rank, per-module and worst relative errors (approximate), output paths, and whether the
        base the LoRA applies to is the original one.

    Raises:
        OptionError: flags that do not fit the mode, a trained adapter that is not DoRA, a contradicting `base`.
        TargetError: a `base` holding another model's weights.
        NumericsError: an approximate error above `tolerance` without `accept_error`.

    Example:
        >>> convert_dora("trained", "lora", mode="approximate", tolerance=1e-2)  # doctest: +SKIP
    """
    started = time.perf_counter()
    _check_options(mode, dtype=dtype, max_rank=max_rank, tolerance=tolerance, accept_error=accept_error)
    plan = plan_dora(trained, out, mode=mode, initial=initial, base=base, dtype=dtype)
    if mode == "exact":
        summary = _write_exact(plan, out, overwrite=overwrite, progress=progress)
    else:
        summary = _write_approximate(
            plan,
            out,
            max_rank=max_rank,
            tolerance=tolerance,
            accept_error=accept_error,
            overwrite=overwrite,
            progress=progress,
        )
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _check_options(mode: str, *, dtype: str, max_rank, tolerance, accept_error: bool) -> None:
    choice("--dora", mode, DORA_MODES)
    choice("--dtype", dtype, DTYPE_FLAGS)
    at_least("--max-rank", max_rank, 1)
    at_least("--tolerance", tolerance, 0)
    if mode == "exact" and (max_rank is not None or tolerance is not None or accept_error):
        raise OptionError(
            "--dora exact: keeps the rank and has no error; drop --max-rank/--tolerance/--accept-error "
            "(they are for --dora approximate)"
        )
    if mode == "approximate" and max_rank is None and tolerance is None:
        raise OptionError("--dora approximate: give --max-rank R, --tolerance X, or both")


def plan_dora(
    trained: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str,
    initial=None,
    base: str | None = None,
    dtype: str = "float32",
) -> DoraPlan:
    """Read what a DoRA conversion needs and check it: the adapter is DoRA, its base is the one it was trained on,
    `base` does not contradict the recorded original (`_check_given_base`)."""
    trained = Path(trained)
    tr = read_adapter(trained, dora=True)
    if not tr.magnitudes:
        raise OptionError(f"--dora: {trained} is not a DoRA adapter (use_dora is false); drop --dora")
    manifest = trained / TRAIN_MANIFEST
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    initial = initial if initial is not None else recorded.get("initial_adapter")
    trained_on = recorded.get("base") or tr.config.get("base_model_name_or_path")
    if not trained_on:
        raise OptionError(
            f"{trained}: neither {TRAIN_MANIFEST} nor adapter_config.json names the base it was trained on"
        )
    task = task_record(trained)
    ckpt = Checkpoint.open(trained_on, scratch=Path(out).absolute().parent)
    check_base(trained, ckpt, flag="the base it was trained on")  # moved or replaced since training: refused
    weights = tr.check_fits(ckpt.tensors, adapter=trained, base=trained_on, config=ckpt.config)
    initial_of = {}
    if initial is not None and starts_offset(initial):  # (a --no-offset start trained on the original itself)
        init = read_adapter(initial, dora=True)
        names = match(init.factors, tr.factors, prefix=(task or {}).get("base_model_prefix"), config=ckpt.config)
        initial_of = {names[m]: (A0, B0, init.scale(m)) for m, (A0, B0) in init.factors.items() if m in names}
    original = (original_base_of(initial) if initial is not None else None) or trained_on
    if base is not None:
        _check_given_base(trained, initial, base, original, mode)
    summary = {
        "trained": str(trained),
        "initial": str(initial) if initial else None,
        "dora": mode,
        "trained_on": str(trained_on),
        "output": str(Path(out).absolute()),
        "modules": len(tr.factors),
    }
    return DoraPlan(
        trained,
        tr,
        initial,
        task,
        ckpt,
        weights,
        initial_of,
        base or original,
        torch_dtype(DTYPE_FLAGS[dtype]),
        summary,
    )


def _write_exact(plan: DoraPlan, out, *, overwrite: bool, progress: bool) -> dict:
    """OUT/base (each adapted W as D·W, every other byte copied) and OUT/adapter (D·B, A), rank r, for it."""
    tr, ckpt = plan.adapter, plan.ckpt
    s_common = config_scale(tr.config)
    rank = max(A.shape[0] for A, _ in tr.factors.values())
    module_of = {w: m for m, w in plan.weights.items()}
    shards = by_shard(ckpt.tensors, module_of)

    def compute(info, W):
        mod = module_of[info.name]
        A, B = tr.factors[mod]
        new_base, DB = exact_parts(W, A, B, tr.scale(mod), tr.magnitudes[mod], transposed=plan.transposed)
        return Replaced(
            new_base.to(W.dtype),
            {"B": (DB * (tr.scale(mod) / s_common)).float()},
            {"max_abs_change": float((new_base - W.double()).abs().max())},
        )

    hashes = Hashes()
    with OutputDir(out, inputs=[plan.trained, ckpt.root], overwrite=overwrite) as od:
        done = rewrite_checkpoint(
            ckpt, od, DORA_BASE_DIR, shards, compute, hashes=hashes, progress=progress, desc="dora exact"
        )
        new_base = od.path / DORA_BASE_DIR
        factors = pad_to_rank(
            {module_of[n]: (tr.factors[module_of[n]][0].float(), extras["B"]) for n, (extras, _) in done.items()}, rank
        )
        config = _lora_config(
            tr,
            factors,
            rank,
            alpha_for(s_common, rank, bool(tr.config.get("use_rslora"))),
            base=str(new_base),
            rslora=bool(tr.config.get("use_rslora")),
        )
        for p in write_adapter(od.path / ADAPTER_DIR, config, factors, dtype=plan.out_dtype, extra=tr.extra):
            hashes.add("output", f"{ADAPTER_DIR}/{p.name}", p)
        summary = _exact_summary(plan, rank, config["lora_alpha"], new_base, od.path / ADAPTER_DIR)
        od.write_manifest(
            CONVERT_MANIFEST,
            {
                **summary,
                "task": plan.task,
                "original": str(plan.original),
                "applies_to": _applies_to_new_base(plan, new_base),
                "files": hashes.result(),
            },
        )
    return summary


def _exact_summary(plan: DoraPlan, rank: int, alpha: float, new_base: Path, adapter: Path) -> dict:
    return {
        **plan.summary,
        "rank": rank,
        "lora_alpha": alpha,
        "vllm_max_lora_rank": vllm_max_lora_rank(rank),
        "base": str(new_base),
        "adapter": str(adapter),
        "base_is_original": False,
        "note": f"the LoRA applies to {new_base} (D·W in the adapted matrices), not to the original "
        f"{plan.original}: serve both together",
    }


def _applies_to_new_base(plan: DoraPlan, new_base: Path) -> dict:
    """The manifest block: the LoRA applies to OUT/base as it is, recognised by its fingerprints."""
    samples = {ORIGINAL: fingerprints(Checkpoint.open(new_base), pick(plan.weights.values()))}
    return BaseOf(ORIGINAL, original=str(new_base), samples=samples).block()


def _write_approximate(
    plan: DoraPlan, out, *, max_rank, tolerance, accept_error: bool, overwrite: bool, progress: bool
) -> dict:
    """OUT: a LoRA on the original model, each module's ΔW = W' − W_original truncated (alpha = r)."""
    found, errors, norms = {}, {}, {}
    for mod in tqdm(sorted(plan.weights), desc="dora approximate", unit="matrix", disable=not progress):
        Bk, Ak, errors[mod], norms[mod] = approximate_factors(
            _dora_delta(plan, mod), max_rank=max_rank, tolerance=tolerance
        )
        found[mod] = (Ak, Bk)
    rank = max(A.shape[0] for A, _ in found.values())
    factors = pad_to_rank(found, rank)
    above = sorted(m for m, e in errors.items() if tolerance is not None and e > tolerance)
    worst = check_tolerance(
        errors,
        None if accept_error else tolerance,
        "--dora approximate",
        "raise --max-rank, use --dora exact, or pass --accept-error to write it anyway",
    )
    config = _lora_config(plan.adapter, factors, rank, float(rank), base=name_or_path(plan.original), rslora=False)
    summary = {
        **plan.summary,
        "rank": rank,
        "lora_alpha": float(rank),
        "vllm_max_lora_rank": vllm_max_lora_rank(rank),
        "base": str(plan.original),
        "base_is_original": True,
        "worst_rel_fro_error": worst,
        "errors": errors,
        "accepted_errors": above,
    }
    with OutputDir(out, inputs=[plan.trained], overwrite=overwrite) as od:
        written = write_adapter(od.path, config, factors, dtype=plan.out_dtype, extra=plan.adapter.extra)
        od.write_manifest(
            CONVERT_MANIFEST,
            {
                **summary,
                "applies_to": converted_identity(plan.trained, plan.initial or plan.trained),
                "delta_fro_norms": norms,
                "tolerance": tolerance,
                "max_rank": max_rank,
                "task": plan.task,
                "files": {"output": {p.name: file_digest(p) for p in written}},
            },
        )
    return summary


def _dora_delta(plan: DoraPlan, mod: str) -> torch.Tensor:
    """ΔW = W' − W_original of one module, [out, in] float64: W_original = W_trained_on + s0·B0·A0 (a residual's)."""
    info = plan.ckpt.tensors[plan.weights[mod]]
    W = read_tensor(plan.ckpt.shard(info.file), info.name)
    A, B = plan.adapter.factors[mod]
    merged = merged_weight(W, A, B, plan.adapter.scale(mod), plan.adapter.magnitudes[mod], transposed=plan.transposed)
    orig = oriented(W, plan.transposed)
    if mod in plan.initial_of:
        A0, B0, s0 = plan.initial_of[mod]
        orig = orig + s0 * (B0.double() @ A0.double())
    return (merged.T if plan.transposed else merged) - orig


def _lora_config(tr: Adapter, factors: dict, rank: int, alpha: float, *, base: str | None, rslora: bool) -> dict:
    c = tr.config
    return lora_config(
        rank=rank,
        alpha=alpha,
        targets=[m.rsplit(".", 1)[-1] for m in factors],
        rslora=rslora,
        base=base,
        task_type=c.get("task_type"),
        fan_in_fan_out=bool(c.get("fan_in_fan_out")),
        modules_to_save=c.get("modules_to_save"),
    )


def _check_given_base(trained: Path, initial, base: str, recorded: str, mode: str) -> None:
    """Refuse a --base that contradicts the original model the manifests record: with another model's weights (as
    `convert` does); for exact, whose LoRA applies to OUT/base, any other than the recorded one or a copy of it."""
    identity = converted_identity(trained, initial or trained)
    meant = BaseOf.from_block(identity, manifest=str(trained)) if identity else None
    if meant is not None:
        check_base_dir(trained, base, meant=meant)  # another model's weights: TargetError
    copy = (
        meant is not None
        and any(Path(base).glob("*.safetensors"))
        and base_problem_dir(trained, base, meant=meant) is None
    )
    if mode == "exact" and not copy and Path(base).expanduser().resolve() != Path(recorded).expanduser().resolve():
        raise OptionError(
            f"--base {base}: --dora exact writes the LoRA for OUT/base, made from the base {trained} was "
            f"trained on, whose original model is {recorded} (as its manifests record); drop --base"
        )
