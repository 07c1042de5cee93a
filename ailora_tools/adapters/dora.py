"""DoRA adapters as a standard LoRA, streamed (`convert --dora exact|approximate`); the maths is `init.dora`'s."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..errors import NumericsError, OptionError
from ..init.dora import approximate_factors, exact_parts, merged_weight, oriented
from ..manifests import ADAPTER_DIR, DORA_BASE_DIR, starts_offset
from ..options import DORA_MODES



def convert_dora(
    trained: str | os.PathLike, out: str | os.PathLike, *, mode: str, initial: str | os.PathLike | None = None,
    max_rank: int | None = None, tolerance: float | None = None, accept_error: bool = False,
    dtype: str = "float32", base: str | None = None, overwrite: bool = False, progress: bool = True,
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
        base: the original model recorded in the approximate LoRA's config (default: from the manifests).

    Returns:
        Summary: mode, rank, per-module and worst relative errors (approximate), output paths, and whether the
        base the LoRA applies to is the original one.

    Raises:
        OptionError: flags that do not fit the mode, a trained adapter that is not DoRA.
        NumericsError: an approximate error above `tolerance` without `accept_error`.

    Example:
        >>> convert_dora("trained", "lora", mode="approximate", tolerance=1e-2)  # doctest: +SKIP
    """
    from ..architectures import match
    from ..io.checkpoint import Checkpoint
    from ..io.hashing import file_digest
    from ..io.output import OutputDir
    from ..io.peft_adapter import lora_config, read_adapter, write_adapter
    from ..io.rewrite import Hashes, Replaced, rewrite_checkpoint
    from ..io.tensorio import DTYPE_FLAGS, read_tensor, torch_dtype
    from ..manifests import (
        CONVERT_MANIFEST,
        ORIGINAL,
        TRAIN_MANIFEST,
        BaseOf,
        check_base,
        converted_identity,
        fingerprints,
        pick,
    )
    from ..options import at_least, choice
    from .check import vllm_max_lora_rank
    from .conversion import _name_or_path, original_base_of, task_record

    started = time.perf_counter()
    choice("--dora", mode, DORA_MODES)
    choice("--dtype", dtype, DTYPE_FLAGS)
    at_least("--max-rank", max_rank, 1)
    at_least("--tolerance", tolerance, 0)
    if mode == "exact" and (max_rank is not None or tolerance is not None or accept_error):
        raise OptionError("--dora exact: keeps the rank and has no error; drop --max-rank/--tolerance/--accept-error "
                          "(they are for --dora approximate)")
    if mode == "approximate" and max_rank is None and tolerance is None:
        raise OptionError("--dora approximate: give --max-rank R, --tolerance X, or both")
    trained = Path(trained)
    tr = read_adapter(trained, dora=True)
    if not tr.magnitudes:
        raise OptionError(f"--dora: {trained} is not a DoRA adapter (use_dora is false); drop --dora")
    manifest = trained / TRAIN_MANIFEST
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if initial is None and recorded.get("initial_adapter"):
        initial = recorded["initial_adapter"]
    trained_on = recorded.get("base") or tr.config.get("base_model_name_or_path")
    if not trained_on:
        raise OptionError(f"{trained}: neither {TRAIN_MANIFEST} nor adapter_config.json names the base it was "
                          "trained on")
    init = read_adapter(initial, dora=True) if initial is not None else None
    task = task_record(trained)
    ckpt = Checkpoint.open(trained_on, scratch=Path(out).absolute().parent)
    check_base(trained, ckpt, flag="the base it was trained on")  # moved or replaced since training: refused
    weights = tr.check_fits(ckpt.tensors, adapter=trained, base=trained_on, config=ckpt.config)
    transposed = bool(tr.config.get("fan_in_fan_out"))
    initial_of: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    if init is not None and starts_offset(initial):  # (a --no-offset start trained on the original itself)
        names = match(init.factors, tr.factors, prefix=(task or {}).get("base_model_prefix"), config=ckpt.config)
        initial_of = {names[m]: (A0, B0, init.scale(m)) for m, (A0, B0) in init.factors.items() if m in names}
    original = base or (original_base_of(Path(initial)) if initial is not None else None) or trained_on
    out_dtype = torch_dtype(DTYPE_FLAGS[dtype])
    summary: dict = {"trained": str(trained), "initial": str(initial) if initial else None, "dora": mode,
                     "trained_on": str(trained_on), "output": str(Path(out).absolute()), "modules": len(tr.factors)}

    if mode == "exact":
        c = tr.config
        rslora = bool(c.get("use_rslora"))
        s_common = c["lora_alpha"] / (math.sqrt(c["r"]) if rslora else c["r"])
        rank = max(A.shape[0] for A, _ in tr.factors.values())
        module_of = {w: m for m, w in weights.items()}
        plan: dict[str, list[str]] = {}
        for name in module_of:
            plan.setdefault(ckpt.tensors[name].file, []).append(name)
        for names in plan.values():
            names.sort(key=lambda n: ckpt.tensors[n].begin)

        def compute(info, W):
            mod = module_of[info.name]
            A, B = tr.factors[mod]
            new_base, DB = exact_parts(W, A, B, tr.scale(mod), tr.magnitudes[mod], transposed=transposed)
            return Replaced(new_base.to(W.dtype), {"B": (DB * (tr.scale(mod) / s_common)).float()},
                            {"max_abs_change": float((new_base - W.double()).abs().max())})

        hashes = Hashes()
        with OutputDir(out, inputs=[trained, ckpt.root], overwrite=overwrite) as od:
            done = rewrite_checkpoint(ckpt, od, DORA_BASE_DIR, plan, compute, hashes=hashes, progress=progress,
                                      desc="dora exact")
            factors = {}
            for name, (extras, _) in done.items():
                A, _B = tr.factors[module_of[name]]
                pad = rank - A.shape[0]
                factors[module_of[name]] = (torch.nn.functional.pad(A.float(), (0, 0, 0, pad)),
                                            torch.nn.functional.pad(extras["B"], (0, pad)))
            config = lora_config(rank=rank, alpha=s_common * (math.sqrt(rank) if rslora else rank),
                                 targets=[m.rsplit(".", 1)[-1] for m in factors], rslora=rslora,
                                 base=str(od.path / DORA_BASE_DIR), task_type=c.get("task_type"),
                                 fan_in_fan_out=transposed, modules_to_save=c.get("modules_to_save"))
            written = write_adapter(od.path / ADAPTER_DIR, config, factors, dtype=out_dtype, extra=tr.extra)
            for p in written:
                hashes.add("output", f"{ADAPTER_DIR}/{p.name}", p)
            summary.update({"rank": rank, "lora_alpha": config["lora_alpha"],
                            "vllm_max_lora_rank": vllm_max_lora_rank(rank),
                            "base": str(od.path / DORA_BASE_DIR), "adapter": str(od.path / ADAPTER_DIR),
                            "base_is_original": False,
                            "note": f"the LoRA applies to {od.path / DORA_BASE_DIR} (D·W in the adapted matrices), "
                                    f"not to the original {original}: serve both together"})
            new_base = od.path / DORA_BASE_DIR  # the LoRA applies to it as it is: recognised by its fingerprints
            applies_to = BaseOf(ORIGINAL, original=str(new_base), samples={ORIGINAL: fingerprints(
                Checkpoint.open(new_base), pick(weights.values()))}).block()
            od.write_manifest(CONVERT_MANIFEST, {**summary, "task": task, "original": str(original),
                                                 "applies_to": applies_to, "files": hashes.result()})
        summary["seconds"] = round(time.perf_counter() - started, 3)
        return summary

    # approximate: ΔW = W' − W_original per module, W_original = W_trained_on + s0·B0·A0 (the residual's original)
    from tqdm.auto import tqdm

    found, errors, norms = {}, {}, {}
    for mod in tqdm(sorted(weights), desc="dora approximate", unit="matrix", disable=not progress):
        info = ckpt.tensors[weights[mod]]
        W = read_tensor(ckpt.shard(info.file), info.name)
        A, B = tr.factors[mod]
        merged = merged_weight(W, A, B, tr.scale(mod), tr.magnitudes[mod], transposed=transposed)
        orig = oriented(W, transposed)
        if mod in initial_of:
            A0, B0, s0 = initial_of[mod]
            orig = orig + s0 * (B0.double() @ A0.double())
        delta = (merged.T if transposed else merged) - orig
        Bk, Ak, errors[mod], norms[mod] = approximate_factors(delta, max_rank=max_rank, tolerance=tolerance)
        found[mod] = (Ak, Bk)
    rank = max(A.shape[0] for A, _ in found.values())
    factors = {m: (torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0])),
                   torch.nn.functional.pad(B, (0, rank - B.shape[1]))) for m, (A, B) in found.items()}
    worst = max(errors.values(), default=0.0)
    above = {m: e for m, e in errors.items() if tolerance is not None and e > tolerance}
    if above and not accept_error:
        bad = ", ".join(f"{m} ({e:.2e})" for m, e in sorted(above.items()))
        raise NumericsError(f"--dora approximate: relative error above --tolerance {tolerance} in {bad}; raise "
                            "--max-rank, use --dora exact, or pass --accept-error to write it anyway")
    c = tr.config
    config = lora_config(rank=rank, alpha=float(rank), targets=[m.rsplit(".", 1)[-1] for m in factors], rslora=False,
                         base=_name_or_path(original), task_type=c.get("task_type"), fan_in_fan_out=transposed,
                         modules_to_save=c.get("modules_to_save"))
    summary.update({"rank": rank, "lora_alpha": float(rank), "vllm_max_lora_rank": vllm_max_lora_rank(rank),
                    "base": str(original), "base_is_original": True, "worst_rel_fro_error": worst,
                    "errors": errors, "accepted_errors": sorted(above)})
    with OutputDir(out, inputs=[trained], overwrite=overwrite) as od:
        written = write_adapter(od.path, config, factors, dtype=out_dtype, extra=tr.extra)
        od.write_manifest(CONVERT_MANIFEST, {**summary, "applies_to": converted_identity(trained, initial or trained),
                                             "delta_fro_norms": norms, "tolerance": tolerance,
                                             "max_rank": max_rank, "task": task,
                                             "files": {"output": {p.name: file_digest(p) for p in written}}})
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


