"""Turn a trained adapter on the residual into a standard LoRA on the ORIGINAL base.

ΔW = s·B·A − s0·B0·A0 = s'·[B·s/s' | −B0·s0/s']·[A ; A0]: a rank-2r LoRA, exact (from a `decompose --no-offset`
start, ΔW = s·B·A: the trained adapter itself, its scale folded into B). One r and one α for
every module (per-module scales folded into B), so servers that ignore rank/alpha patterns scale it
right. `max_rank` re-compresses each module exactly up to truncation: QR of both factors, SVD of the
small core, keep the largest triplets; the dropped singular values give the reported error (`lowrank`).

The trained adapter names modules as the class it was trained on (BertForSequenceClassification:
`bert.encoder...`), the initial one as the decomposed checkpoint stores them (a bare BertModel: `encoder...`);
they are paired through the base model prefix the training manifest records (`model_names`), and the output
keeps the trained names and its `modules_to_save` (a classification head) unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AiloraError, OptionError
from ..experts import lift_initial
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import (
    CONFIG_NAME,
    Adapter,
    lora_config,
    read_adapter,
    write_adapter,
)
from ..io.tensorio import DTYPE_FLAGS, torch_dtype
from ..lineage import initial_adapter_of
from ..manifests import (
    CONVERT_MANIFEST,
    TRAIN_MANIFEST,
    BaseOf,
    check_base_dir,
    converted_identity,
    name_or_path,
    original_base_of,
    read_manifest,
    starts_offset,
    task_record,
)
from ..options import VLLM_MAX_LORA_RANKS, at_least, choice
from .check import check_adapter
from .dora import convert_dora
from .lowrank import alpha_for, check_tolerance, delta_factors, fit_rank, pad_to_rank
from .nf4_residual import quantized_run, read_dequantized, rel_error, trained_reference
from .rules import vllm_max_lora_rank
from .serving import export_for, serve_command, serve_rules


@dataclass
class Conversion:
    """A planned conversion: the LoRA to write (config, factors, rank) and what the summary reports of it."""

    trained: Path
    initial: Path
    task: dict | None
    source: Adapter  # the trained adapter
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[str, float]
    worst: float
    unchanged: dict[str, bool]
    served: dict = field(default_factory=dict)  # the server's rules' report (`serve_rules`), with a server


def convert(
    trained: str | os.PathLike,
    out: str | os.PathLike,
    *,
    initial: str | os.PathLike | None = None,
    max_rank: int | None = None,
    tolerance: float | None = None,
    dtype: str = "float32",
    base: str | None = None,
    overwrite: bool = False,
    server: str | None = None,
    max_lora_rank: int | None = None,
    dora: str | None = None,
    accept_error: bool = False,
    progress: bool = True,
) -> dict:
    """Write a PEFT LoRA directory that gives the trained model on the original (untouched) base.

    Args:
        trained: adapter trained on the residual (ours, or from PEFT's PiSSA workflow).
        out: output directory for the standard LoRA.
        initial: the initial adapter, for a trained adapter without ailora-train.json (its manifest names it;
            another one than that is refused, a copy of it accepted).
        max_rank: re-compress every module to at most this rank; errors are reported.
        tolerance: fail if any module's relative Frobenius error exceeds it.
        dtype: float32, float16 or bfloat16 for the saved factors.
        base: original model id/path recorded in the config (default: from the decompose manifest).
        server: "vllm" or "llama.cpp": apply that server's rules to the result (`serving`: scale baked into B with
            lora_alpha = r, one rank it accepts, refusals). With a server, `trained` may also be a LoRA that already
            applies to the original model (no training manifest, no `initial`): then only the rules apply.
        max_lora_rank: with server "vllm", the server's --max-lora-rank (default 512): higher ranks re-compress.
        dora: for a DoRA adapter, "exact" (OUT/base = D·W + OUT/adapter, the base no longer the original) or
            "approximate" (truncated SVD of W' − W on the original; `max_rank` and/or `tolerance`); see
            `adapters.dora.convert_dora`. accept_error: write an approximate conversion above `tolerance` anyway.
        progress: show a tqdm bar (DoRA conversions, which read the base).

    Returns:
        Summary: rank, alpha, the vLLM `--max-lora-rank` needed, per-module and worst errors.

    Raises:
        AiloraError: ΔW = 0 (nothing trained), mismatched adapters, or an error above `tolerance`.

    Example:
        >>> convert("trained", "lora", initial="out/adapter", max_rank=32)  # doctest: +SKIP
    """
    written = dict(max_rank=max_rank, tolerance=tolerance, dtype=dtype, base=base, overwrite=overwrite)
    if dora is not None:
        _refuse_server_with_dora(dora, server=server, max_lora_rank=max_lora_rank)
        return convert_dora(
            trained, out, mode=dora, initial=initial, accept_error=accept_error, progress=progress, **written
        )
    _check_options(trained, max_rank=max_rank, tolerance=tolerance, dtype=dtype, accept_error=accept_error)
    trained = Path(trained)
    if server is not None and initial is None and not (trained / TRAIN_MANIFEST).is_file():
        # already a LoRA on the original model: only the server's rules
        return export_for(trained, out, server=server, max_lora_rank=max_lora_rank, **written)
    plan = plan_conversion(trained, initial=initial, max_rank=max_rank, tolerance=tolerance, base=base)
    if server is not None:
        _apply_server_rules(plan, trained, out, server=server, max_lora_rank=max_lora_rank, tolerance=tolerance)
    return _write(plan, out, dtype=dtype, overwrite=overwrite, server=server, max_rank=max_rank)


def _refuse_server_with_dora(dora: str, *, server: str | None, max_lora_rank: int | None) -> None:
    """A DoRA conversion takes no server options: the server's rules run on its result, in a second step."""
    if server is not None or max_lora_rank is not None:
        raise OptionError(
            f"--dora {dora}: not with --for/--max-lora-rank; convert first, then run `ailora-tools "
            "convert --trained OUT/adapter --for SERVER` (exact) or on OUT (approximate)"
        )


def _apply_server_rules(
    plan: Conversion, trained: Path, out, *, server: str, max_lora_rank: int | None, tolerance: float | None
) -> None:
    """The server's rules on the planned LoRA (serving.py), in place; refusals raise before anything is written."""
    lora, plan.served = serve_rules(
        Adapter(plan.config, plan.factors, plan.source.extra),
        server=server,
        source=trained,
        max_lora_rank=max_lora_rank,
        tolerance=tolerance,
    )
    plan.config, plan.factors = lora.config, lora.factors
    plan.served["serve_command"] = serve_command(
        server, Path(out).absolute(), plan.config["base_model_name_or_path"], plan.config["r"]
    )


def _check_options(trained, *, max_rank, tolerance, dtype, accept_error) -> None:
    """The options of a conversion without --dora, and a DoRA adapter given without it."""
    if accept_error:
        raise OptionError("--accept-error: only for --dora approximate")
    if read_manifest(Path(trained) / CONFIG_NAME).get("use_dora"):  # (a BitFit output has no adapter config)
        raise OptionError(
            f"--trained {trained}: a DoRA adapter (use_dora is true); choose --dora exact (a new base + "
            "LoRA, no error) or --dora approximate --max-rank R|--tolerance X (a LoRA on the original, "
            f"error measured), or serve it merged: `ailora-tools merge BASE {trained} -o MERGED`"
        )
    at_least("--max-rank", max_rank, 1)
    at_least("--tolerance", tolerance, 0)
    choice("--dtype", dtype, DTYPE_FLAGS)


def plan_conversion(
    trained: Path, *, initial=None, max_rank: int | None = None, tolerance: float | None = None, base: str | None = None
) -> Conversion:
    """The LoRA on the original model that `convert` writes for `trained`: ΔW's factors (`lowrank.delta_factors`),
    re-compressed to `max_rank`, padded to one rank, with its config.

    Raises:
        AiloraError: ΔW = 0; FormatError: mismatched adapters; NumericsError: an error above `tolerance`;
        TargetError: a `base` holding another model's weights than the recorded original.
    """
    initial = initial_adapter_of(trained, initial)
    if base is not None and (original := converted_identity(trained, initial)) is not None:  # --base: that model?
        check_base_dir(trained, base, meant=BaseOf.from_block(original, manifest=str(trained / TRAIN_MANIFEST)))
    tr_ad, task = read_adapter(trained), task_record(trained)
    init_ad = lift_initial(read_adapter(initial), tr_ad)  # experts trained fused: the initial pairs in that form
    pairs, scale, unchanged = delta_factors(
        init_ad,
        tr_ad,
        prefix=(task or {}).get("base_model_prefix"),
        config=_model_config(init_ad),
        offset=starts_offset(initial),
    )
    if all(unchanged.values()):
        raise AiloraError(
            f"{trained}: the trained adapter equals the initial one {initial} (ΔW = 0): nothing "
            "was learned, so there is nothing to convert; check that training ran and saved"
        )
    full_rank = max(B.shape[1] for B, _ in pairs.values())
    rank = full_rank if max_rank is None else min(max_rank, full_rank)
    kept, recompressed = fit_rank(pairs, rank)
    errors = {m: recompressed.get(m, 0.0) for m in pairs}
    worst = check_tolerance(errors, tolerance, f"--max-rank {max_rank}", "raise --max-rank or the tolerance")
    factors = pad_to_rank(kept, rank)  # one r for every module: zero directions
    c = tr_ad.config
    rslora = bool(c.get("use_rslora"))
    config = lora_config(
        rank=rank,
        alpha=alpha_for(scale, rank, rslora),
        targets=[m.rsplit(".", 1)[-1] for m in factors],
        rslora=rslora,
        base=name_or_path(base or original_base_of(initial) or c.get("base_model_name_or_path")),
        task_type=c.get("task_type"),
        fan_in_fan_out=bool(c.get("fan_in_fan_out")),
        modules_to_save=c.get("modules_to_save"),
    )
    return Conversion(Path(trained), initial, task, tr_ad, config, factors, errors, worst, unchanged)


def _write(plan: Conversion, out, *, dtype: str, overwrite: bool, server: str | None, max_rank: int | None) -> dict:
    """Write the planned LoRA and ailora-convert.json (with the check of what was written); return the summary."""
    config, served, c = plan.config, plan.served, plan.source.config
    run = quantized_run(plan.initial)
    quantized = _trained_errors(run, plan.source, Adapter(config, plan.factors)) if run is not None else {}
    summary = {
        "trained": str(plan.trained),
        "initial": str(plan.initial),
        "output": str(Path(out).absolute()),
        "rank": config["r"],
        "lora_alpha": config["lora_alpha"],
        "use_rslora": bool(c.get("use_rslora")),
        "modules": len(plan.factors),
        "vllm_max_lora_rank": served["vllm_max_lora_rank"] if served else vllm_max_lora_rank(config["r"]),
        "worst_rel_fro_error": plan.worst,
        "unchanged_modules": sorted(m for m, u in plan.unchanged.items() if u),
        "errors": plan.errors,
        "modules_to_save": sorted(c.get("modules_to_save") or []),
        **served,
        **quantized,
    }
    with OutputDir(out, inputs=[plan.trained, plan.initial], overwrite=overwrite) as od:
        written = write_adapter(
            od.path,
            config,
            plan.factors,
            dtype=torch_dtype(DTYPE_FLAGS[dtype]),
            extra=plan.source.extra if server is None else None,
        )
        summary["check_for"] = server or "vllm"  # the output checked against the server's rules (check.py)
        summary["check"] = summary["vllm_check"] = [
            str(f)
            for f in check_adapter(
                od.path,
                target=server or "vllm",
                max_lora_rank=summary["vllm_max_lora_rank"] or VLLM_MAX_LORA_RANKS[-1],
                base=config["base_model_name_or_path"],
            )
        ]
        od.write_manifest(
            CONVERT_MANIFEST,
            {
                **summary,
                "task": plan.task,
                "applies_to": converted_identity(plan.trained, plan.initial),
                "files": {"output": {p.name: file_digest(p) for p in written}},
            },
        )
    return summary


def _model_config(adapter: Adapter) -> dict | None:
    """The config.json of the model an adapter names as its base, when that is a local directory."""
    base = adapter.config.get("base_model_name_or_path")
    return read_manifest(Path(str(base)) / "config.json") or None if base else None


def _trained_errors(run, trained: Adapter, converted: Adapter) -> dict:
    """For an adapter trained on a quantised residual: per weight ‖W + ΔW − W_trained‖ / ‖W_trained‖ with W_trained =
    dequant(Q) + s·B·A (`nf4_residual`), what the LoRA on the original gives instead of the model that was trained:
    the quantisation error, which no LoRA of the same rank removes. Read one matrix at a time."""
    original = run.open_original()
    errors = {}
    for name in sorted(run.packed | {f"{m}.weight" for m in trained.factors}):
        m = name.removesuffix(".weight")
        got = read_dequantized(original, name) + (converted.delta(m) if m in converted.factors else 0)
        errors[m] = rel_error(got, trained_reference(run, trained, name))
    return {
        "quantized_residual": str(run.residual.root),
        "trained_errors": errors,
        "worst_trained_rel_fro_error": max(errors.values(), default=0.0),
    }
