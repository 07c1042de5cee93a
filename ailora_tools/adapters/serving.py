"""Exports every server takes as they are (`convert --for vllm|llama.cpp`); what none can take is `rules.refusals`.

The rules, applied to a LoRA on the original model (a converted adapter, a plain PEFT LoRA, or what `convert`
has just computed from a trained one):

- the scale is baked into B (B·s), the config says `lora_alpha = r`, `use_rslora: false`, no rank or alpha
  patterns: the same PEFT logits, and no engine can scale it wrongly (llama.cpp's converter and some engines
  ignore `use_rslora`; older vLLM ignores the patterns);
- one rank for every module: padded with zeros (exact) to the next rank vLLM accepts (1, 8, 16, 32, 64, 128,
  256, 320, 512); above 512, or above `--max-lora-rank N` for a server started with a smaller limit, each module
  is re-compressed (QR of both factors, SVD of the small core: `lowrank.compress`) and the error reported;
- llama.cpp: one `adapter.lora.alpha` per file, so every module is brought to one rank with alpha = r; only
  modules llama.cpp maps to a tensor of the base's architecture;
- refused, never dropped: a trained head or resized embedding (`modules_to_save`), trained biases (PEFT's
  `bias`/`lora_bias`, or a `train --bitfit` output), DoRA, modules the server serves no LoRA on. Each refusal
  says what to do (merge; or serve the head/embedding with the base).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OptionError, TargetError, UnsupportedError
from ..init.peft_inits import applies_to_original
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import Adapter, lora_config, read_adapter, write_adapter
from ..io.tensorio import DTYPE_FLAGS, torch_dtype
from ..manifests import CONVERT_MANIFEST, base_of, check_base_dir, require_original
from ..options import SERVERS, VLLM_MAX_LORA_RANKS, at_least, choice
from ..training.bitfit import is_bitfit
from .check import check_adapter
from .lowrank import check_tolerance, fit_rank, pad_to_rank
from .rules import refusals, vllm_max_lora_rank


def serve_rules(
    adapter: Adapter,
    *,
    server: str,
    source: object,
    max_lora_rank: int | None = None,
    max_rank: int | None = None,
    tolerance: float | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[Adapter, dict]:
    """`adapter` (a LoRA on the original model) as `server` takes it: scales baked, one allowed rank, refusals.

    Args:
        server: "vllm" or "llama.cpp".
        source: the adapter's directory, named in errors and fixes.
        max_lora_rank: vLLM: the server's --max-lora-rank (one of 1, 8, ..., 512; default 512).
        max_rank: re-compress every module above this rank.
        tolerance: fail when a re-compressed module's relative Frobenius error exceeds it.
        base: the original model directory (llama.cpp: its config.json), default `base_model_name_or_path`.

    Returns:
        The adapter to write (float64 factors, config with r = lora_alpha, no rsLoRA, no patterns, no
        modules_to_save) and a report: server, rank, lora_alpha, use_rslora, ranks before, padded and
        re-compressed modules, the worst relative error, the vLLM --max-lora-rank it needs.

    Raises:
        UnsupportedError: a refusal (`refusals`), naming every rule it breaks and what to do.
        OptionError: a --max-lora-rank vLLM does not accept, or one for llama.cpp.
        NumericsError: a re-compression error above `tolerance`.

    Example:
        >>> serve_rules(read_adapter("lora"), server="vllm", source="lora", max_lora_rank=64)  # doctest: +SKIP
    """
    choice("--for", server, SERVERS)
    at_least("--max-rank", max_rank, 1)
    at_least("--tolerance", tolerance, 0)
    if max_lora_rank is not None and server != "vllm":
        raise OptionError(f"--max-lora-rank is the vLLM server's limit; for --for {server} use --max-rank")
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise OptionError(f"--max-lora-rank {max_lora_rank}: vLLM accepts {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    found = refusals(source, adapter.config, adapter, server=server, base=base)
    if found:
        raise UnsupportedError(f"{source} cannot be served by {server} as a LoRA: " + " | ".join(map(str, found)))
    caps = [c for c in (max_rank, max_lora_rank or (VLLM_MAX_LORA_RANKS[-1] if server == "vllm" else None)) if c]
    cap = min(caps) if caps else None
    # the scale lives in B: alpha = r gives s = 1
    baked, errors = fit_rank(
        {m: (B.double() * adapter.scale(m), A.double()) for m, (A, B) in adapter.factors.items()}, cap
    )
    worst = check_tolerance(
        errors,
        tolerance,
        f"{source}: re-compressing to rank {cap} for {server}",
        "raise --max-lora-rank / --max-rank (and the server's limit)",
    )
    largest = max(A.shape[0] for A, _ in baked.values())
    rank = vllm_max_lora_rank(largest) if server == "vllm" else largest
    factors = pad_to_rank(baked, rank)
    c = adapter.config
    config = lora_config(
        rank=rank,
        alpha=float(rank),
        targets=[m.rsplit(".", 1)[-1] for m in factors],
        rslora=False,
        base=c.get("base_model_name_or_path"),
        task_type=c.get("task_type"),
        fan_in_fan_out=bool(c.get("fan_in_fan_out")),
    )
    report = {
        "server": server,
        "rank": rank,
        "lora_alpha": float(rank),
        "use_rslora": False,
        "ranks_before": sorted({A.shape[0] for A, _ in adapter.factors.values()}),
        "padded_modules": sorted(m for m, (A, _) in baked.items() if A.shape[0] < rank),
        "recompressed": errors,
        "serving_worst_rel_fro_error": worst,
        "vllm_max_lora_rank": vllm_max_lora_rank(rank) if rank <= VLLM_MAX_LORA_RANKS[-1] else None,
    }
    return Adapter(config, factors), report


def serve_command(server: str, lora: object, base: object, rank: int) -> str:
    """How to start `server` with the exported adapter."""
    if server == "vllm":
        return (
            f"vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} --lora-modules adapter={lora}"
        )
    return (
        f"ailora-tools export-gguf {lora} --base {base} -o adapter.gguf, "
        "then llama-server -m BASE.gguf --lora adapter.gguf"
    )


def export_for(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    server: str,
    max_lora_rank: int | None = None,
    max_rank: int | None = None,
    tolerance: float | None = None,
    dtype: str = "float32",
    base: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `adapter`, a LoRA that already applies to the original model (a converted one, a plain PEFT LoRA), as
    `server` takes it (`serve_rules`). A trained adapter goes through `conversion.convert(server=...)` instead.

    Args:
        adapter: PEFT LoRA directory on the original model.
        out: output directory (a PEFT LoRA and ailora-convert.json).
        server, max_lora_rank, max_rank, tolerance, base: as for `serve_rules`. dtype: of the saved factors.

    Returns:
        Summary: output, rank, lora_alpha, modules, the rule report, the check of the output, how to serve it.

    Raises:
        TargetError: an adapter that applies to decompose's residual or to PEFT's PiSSA residual (convert it).
        UnsupportedError, OptionError, NumericsError: as for `serve_rules`.

    Example:
        >>> export_for("peft-lora", "lora-vllm", server="vllm", max_lora_rank=64)  # doctest: +SKIP
    """
    choice("--for", server, SERVERS)
    choice("--dtype", dtype, DTYPE_FLAGS)
    d = Path(adapter)
    if is_bitfit(d):
        raise UnsupportedError(f"{d} cannot be served by {server} as a LoRA: {refusals(d, {}, None, server=server)[0]}")
    require_original(d, server)
    lora = read_adapter(d, strict=False)
    if not refusals(d, lora.config, lora, server=server, base=base):
        lora = read_adapter(d)  # strict: a tensor that is no LoRA factor is an error, never dropped
    if not applies_to_original(lora.config.get("init_lora_weights")):  # mica, orthogonal, eva: written as true
        raise TargetError(
            f"{d}: init_lora_weights is {lora.config['init_lora_weights']!r}: a PiSSA-style adapter "
            "applies to its residual, not to the original model; run `ailora-tools convert --trained "
            f"{d} --initial INITIAL --for {server} -o LORA` (INITIAL: the adapter training started from)"
        )
    if base is not None:
        check_base_dir(d, base, flag="--base")  # the model the manifest records, when --base holds weights
        lora.config["base_model_name_or_path"] = str(Path(base).absolute()) if Path(base).is_dir() else base
    served, report = serve_rules(
        lora, server=server, source=d, max_lora_rank=max_lora_rank, max_rank=max_rank, tolerance=tolerance
    )
    where = served.config["base_model_name_or_path"]
    summary = {
        "adapter": str(d),
        "output": str(Path(out).absolute()),
        "modules": len(served.factors),
        **report,
        "serve_command": serve_command(server, Path(out).absolute(), where or "BASE", report["rank"]),
    }
    with OutputDir(out, inputs=[d], overwrite=overwrite) as od:
        written = write_adapter(od.path, served.config, served.factors, dtype=torch_dtype(DTYPE_FLAGS[dtype]))
        summary["check_for"] = server
        summary["check"] = [
            str(f)
            for f in check_adapter(od.path, target=server, base=where, max_lora_rank=max_lora_rank or report["rank"])
        ]
        od.write_manifest(
            CONVERT_MANIFEST,
            {
                **summary,
                "applies_to": base_of(d).block(),
                "files": {"output": {p.name: file_digest(p) for p in written}},
            },
        )
    return summary
