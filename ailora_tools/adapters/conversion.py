"""Turn a trained adapter on the residual into a standard LoRA on the ORIGINAL base.

ΔW = s·B·A − s0·B0·A0 = s'·[B·s/s' | −B0·s0/s']·[A ; A0]: a rank-2r LoRA, exact (from a `decompose --no-offset`
start, ΔW = s·B·A: the trained adapter itself, its scale folded into B). One r and one α for
every module (per-module scales folded into B), so servers that ignore rank/alpha patterns scale it
right. `max_rank` re-compresses each module exactly up to truncation: QR of both factors, SVD of the
small core, keep the largest triplets; the dropped singular values give the reported error.

The trained adapter names modules as the class it was trained on (BertForSequenceClassification:
`bert.encoder...`), the initial one as the decomposed checkpoint stores them (a bare BertModel: `encoder...`);
they are paired through the base model prefix the training manifest records (`model_names`), and the output
keeps the trained names and its `modules_to_save` (a classification head) unchanged.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..architectures import match
from ..errors import (
    AiloraError,
    FormatError,
    InputNotFoundError,
    NumericsError,
    OptionError,
)
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
from ..manifests import (
    BITFIT_MANIFEST,
    CONVERT_MANIFEST,
    DECOMPOSE_MANIFEST,
    TRAIN_MANIFEST,
    BaseOf,
    adapter_digest,
    check_base_dir,
    converted_identity,
    read_manifest,
    starts_offset,
)
from ..options import at_least, choice
from .check import VLLM_MAX_LORA_RANKS, check_adapter, vllm_max_lora_rank


def initial_adapter_of(trained: Path, given: str | os.PathLike | None = None) -> Path:
    """The initial adapter a trained adapter started from, as its training manifest records; `given` (--initial)
    only where no manifest names one, or where it holds the same weights (a copy).

    Raises:
        InputNotFoundError: no manifest and no `given`; the recorded adapter is gone and none is given.
        OptionError: `given` is another adapter than the recorded one, or the recorded one changed since training.
    """
    manifest = Path(trained) / TRAIN_MANIFEST
    if not manifest.is_file():
        if given is None:
            raise InputNotFoundError(f"{trained}: no {TRAIN_MANIFEST} naming the initial adapter; pass --initial")
        return Path(given)
    m = json.loads(manifest.read_text())
    recorded, digest = Path(m["initial_adapter"]), (m.get("inputs") or {}).get("--adapter")
    if given is None or Path(given).resolve() == recorded.resolve():
        if digest and recorded.is_dir() and adapter_digest(recorded) != digest:
            raise OptionError(f"{trained}: the initial adapter {recorded} its {TRAIN_MANIFEST} names changed since "
                              "training (its weights differ from the recorded digest); pass --initial with the adapter "
                              "training started from")
        return recorded
    if digest is not None and adapter_digest(given) == digest:
        return Path(given)  # the recorded adapter, copied or moved
    raise OptionError(f"--initial {given}: {trained} was trained from {recorded} ({TRAIN_MANIFEST})" +
                      (", whose weights differ from these" if digest else "") +
                      "; drop --initial to use the recorded one, or pass a copy of it")


def original_base_of(initial: Path) -> str | None:
    """The original model an initial adapter was decomposed from (its decompose manifest's source)."""
    manifest = Path(initial).parent / DECOMPOSE_MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("source", {}).get("model")
    return None


def task_record(adapter_dir: str | os.PathLike) -> dict | None:
    """The task record (`tasks.load_model`) of a trained or converted adapter's manifest, if it has one."""
    for name in (TRAIN_MANIFEST, CONVERT_MANIFEST, BITFIT_MANIFEST):
        if (path := Path(adapter_dir) / name).is_file():
            return json.loads(path.read_text()).get("task")
    return None


def delta_factors(initial: Adapter, trained: Adapter, *, prefix: str | None = None,
                  config: dict | None = None, offset: bool = True) -> tuple[dict, float, dict]:
    """Per module (B', A') with s'·B'·A' = ΔW, the common scale s', and a per-module ΔW-is-zero flag.

    Keys are the trained adapter's module names; the initial adapter's may differ from them by the base model
    prefix (`prefix`, or looked up from the model `config` when the names differ). `offset`: the base was offset by
    s0·B0·A0 (or exact mode subtracted it); False for a `--no-offset` start, whose ΔW is s·B·A alone.
    """
    names = match(initial.factors, trained.factors, prefix=prefix, config=config)
    if len(names) != len(initial.factors) or len(trained.factors) != len(initial.factors):
        unpaired = (set(initial.factors) - set(names)) | (set(trained.factors) - set(names.values()))
        raise FormatError(f"initial and trained adapters adapt different modules: {sorted(unpaired)}")
    initial = Adapter(initial.config, {names[m]: f for m, f in initial.factors.items()})
    c = trained.config
    s_common = c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"])
    out, unchanged = {}, {}
    for m, (A, B) in trained.factors.items():
        A0, B0 = initial.factors[m]
        if A.shape != A0.shape or B.shape != B0.shape:
            raise FormatError(f"{m}: trained factors {tuple(A.shape)}/{tuple(B.shape)} do not match the initial "
                              f"{tuple(A0.shape)}/{tuple(B0.shape)}; pass the initial adapter this training started from")
        s, s0 = trained.scale(m), initial.scale(m)
        if not offset or not B0.any():  # plain LoRA (B0 = 0) or no offset: ΔW = s·B·A, rank r
            out[m] = (B.double() * (s / s_common), A.double())
        else:
            B_cat = torch.cat([B.double() * (s / s_common), -B0.double() * (s0 / s_common)], dim=1)
            out[m] = (B_cat, torch.cat([A.double(), A0.double()], dim=0))
        unchanged[m] = torch.equal(A, A0) and torch.equal(B, B0) and s == s0
    return out, s_common, unchanged


def _model_config(adapter: Adapter) -> dict | None:
    """The config.json of the model an adapter names as its base, when that is a local directory."""
    base = adapter.config.get("base_model_name_or_path")
    path = Path(str(base)) / "config.json" if base else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def compress(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of B·A (Eckart–Young), and the relative Frobenius error of dropping the rest."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T)
    k = min(k, S.numel())
    root = S[:k].sqrt()
    total = float(S.square().sum())
    err = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return Qb @ (Uc[:, :k] * root), (root[:, None] * Vch[:k]) @ Qa.T, err


def convert(
    trained: str | os.PathLike, out: str | os.PathLike, *, initial: str | os.PathLike | None = None,
    max_rank: int | None = None, tolerance: float | None = None, dtype: str = "float32", base: str | None = None,
    overwrite: bool = False, server: str | None = None, max_lora_rank: int | None = None, dora: str | None = None,
    accept_error: bool = False, progress: bool = True,
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
    if dora is not None:
        from .dora import convert_dora

        if server is not None or max_lora_rank is not None:
            raise OptionError(f"--dora {dora}: not with --for/--max-lora-rank; convert first, then run `ailora-tools "
                              "convert --trained OUT/adapter --for SERVER` (exact) or on OUT (approximate)")
        return convert_dora(trained, out, mode=dora, initial=initial, max_rank=max_rank, tolerance=tolerance,
                            accept_error=accept_error, dtype=dtype, base=base, overwrite=overwrite,
                            progress=progress)
    if accept_error:
        raise OptionError("--accept-error: only for --dora approximate")
    if read_manifest(Path(trained) / CONFIG_NAME).get("use_dora"):  # (a BitFit output has no adapter config)
        raise OptionError(f"--trained {trained}: a DoRA adapter (use_dora is true); choose --dora exact (a new base + "
                          "LoRA, no error) or --dora approximate --max-rank R|--tolerance X (a LoRA on the original, "
                          "error measured), or serve it merged: `ailora-tools merge BASE ADAPTER -o merged`")
    at_least("--max-rank", max_rank, 1)
    at_least("--tolerance", tolerance, 0)
    choice("--dtype", dtype, DTYPE_FLAGS)
    trained = Path(trained)
    if server is not None and initial is None and not (trained / TRAIN_MANIFEST).is_file():
        from .serving import (
            export_for,  # already a LoRA on the original model: only the server's rules
        )

        return export_for(trained, out, server=server, max_lora_rank=max_lora_rank, max_rank=max_rank,
                          tolerance=tolerance, dtype=dtype, base=base, overwrite=overwrite)
    initial = initial_adapter_of(trained, initial)
    if base is not None and (original := converted_identity(trained, initial)) is not None:  # --base: that model?
        check_base_dir(trained, base, meant=BaseOf.from_block(original, manifest=str(trained / TRAIN_MANIFEST)))
    init_ad, tr_ad, task = read_adapter(initial), read_adapter(trained), task_record(trained)
    pairs, scale, unchanged = delta_factors(init_ad, tr_ad, prefix=(task or {}).get("base_model_prefix"),
                                            config=_model_config(init_ad), offset=starts_offset(initial))
    if all(unchanged.values()):
        raise AiloraError(f"{trained}: the trained adapter equals the initial one {initial} (ΔW = 0): nothing "
                          "was learned, so there is nothing to convert; check that training ran and saved")
    full_rank = max(B.shape[1] for B, _ in pairs.values())
    rank = full_rank if max_rank is None else min(max_rank, full_rank)
    factors, errors = {}, {}
    for m, (B, A) in pairs.items():
        if B.shape[1] > rank:
            B, A, errors[m] = compress(B, A, rank)
        else:
            errors[m] = 0.0
        pad = rank - B.shape[1]  # one r for every module: pad with zero directions
        factors[m] = (torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad)))
    worst = max(errors.values(), default=0.0)
    if tolerance is not None and worst > tolerance:
        bad = ", ".join(f"{m} ({e:.2e})" for m, e in sorted(errors.items()) if e > tolerance)
        raise NumericsError(f"--max-rank {max_rank}: relative error above --tolerance {tolerance} in {bad}; "
                            "raise --max-rank or the tolerance")
    c = tr_ad.config
    rslora = bool(c.get("use_rslora"))
    config = lora_config(rank=rank, alpha=scale * (math.sqrt(rank) if rslora else rank),
                         targets=[m.rsplit(".", 1)[-1] for m in factors], rslora=rslora,
                         base=_name_or_path(base or original_base_of(initial) or c.get("base_model_name_or_path")),
                         task_type=c.get("task_type"), fan_in_fan_out=bool(c.get("fan_in_fan_out")),
                         modules_to_save=c.get("modules_to_save"))
    served = {}
    if server is not None:  # the server's rules on the converted LoRA (serving.py); refusals raise before writing
        from .serving import serve_command, serve_rules

        lora, served = serve_rules(Adapter(config, factors, tr_ad.extra), server=server, source=trained,
                                   max_lora_rank=max_lora_rank, tolerance=tolerance)
        config, factors, rank = lora.config, lora.factors, lora.config["r"]
        served["serve_command"] = serve_command(server, Path(out).absolute(), config["base_model_name_or_path"], rank)
    from .nf4_residual import quantized_run

    run = quantized_run(initial)
    quantized = _trained_errors(run, tr_ad, Adapter(config, factors)) if run is not None else {}
    summary = {
        "trained": str(trained), "initial": str(initial), "output": str(Path(out).absolute()),
        "rank": rank, "lora_alpha": config["lora_alpha"], "use_rslora": rslora, "modules": len(factors),
        "vllm_max_lora_rank": served["vllm_max_lora_rank"] if served else vllm_max_lora_rank(rank),
        "worst_rel_fro_error": worst,
        "unchanged_modules": sorted(m for m, u in unchanged.items() if u), "errors": errors,
        "modules_to_save": sorted(c.get("modules_to_save") or []), **served, **quantized,
    }
    with OutputDir(out, inputs=[trained, initial], overwrite=overwrite) as od:
        written = write_adapter(od.path, config, factors, dtype=torch_dtype(DTYPE_FLAGS[dtype]),
                                extra=tr_ad.extra if server is None else None)
        summary["check_for"] = server or "vllm"  # the output checked against the server's rules (check.py)
        summary["check"] = summary["vllm_check"] = [str(f) for f in check_adapter(
            od.path, target=server or "vllm", max_lora_rank=summary["vllm_max_lora_rank"] or VLLM_MAX_LORA_RANKS[-1],
            base=config["base_model_name_or_path"])]
        od.write_manifest(CONVERT_MANIFEST, {**summary, "task": task, "applies_to": converted_identity(trained, initial),
                                             "files": {"output": {p.name: file_digest(p) for p in written}}})
    return summary


def _trained_errors(run, trained: Adapter, converted: Adapter) -> dict:
    """For an adapter trained on a quantised residual: per weight ‖W + ΔW − W_trained‖ / ‖W_trained‖ with W_trained =
    dequant(Q) + s·B·A (`nf4_residual`), what the LoRA on the original gives instead of the model that was trained:
    the quantisation error, which no LoRA of the same rank removes. Read one matrix at a time."""
    from .nf4_residual import read_dequantized, rel_error, trained_reference

    original = run.open_original()
    errors = {}
    for name in sorted(run.packed | {f"{m}.weight" for m in trained.factors}):
        m = name.removesuffix(".weight")
        got = read_dequantized(original, name) + (converted.delta(m) if m in converted.factors else 0)
        errors[m] = rel_error(got, trained_reference(run, trained, name))
    return {"quantized_residual": str(run.residual.root), "trained_errors": errors,
            "worst_trained_rel_fro_error": max(errors.values(), default=0.0)}


def _name_or_path(base: str | None) -> str | None:
    """A local directory as an absolute path (PEFT resolves relative ones from the caller's directory), else as is."""
    return str(Path(base).expanduser().absolute()) if base and Path(base).expanduser().is_dir() else base
