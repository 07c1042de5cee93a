"""convert, merge, export-gguf, export-base, check, push: serving a trained adapter."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from .. import (
    adapters as stage,  # its functions load torch on first use (after a command's hashing has started)
)
from ..options.commands import (
    CheckOptions,
    ConvertOptions,
    ExportBaseOptions,
    ExportGgufOptions,
    MergeOptions,
    PushOptions,
    Report,
)
from .app import (
    fail_cleanly,
    main,
    passive_openmp,
    prehash,
    print_summary,
    print_trained_errors,
    progress,
)
from .flags import from_options, required_path


@main.command()
@required_path(
    "--trained",
    help="Adapter trained on the residual (ours or PEFT's PiSSA workflow); with --for, also a LoRA already "
    "on the original model (converted, plain PEFT).",
)
@from_options(ConvertOptions, Report, skip=("quiet",))
@fail_cleanly
def convert(trained, as_json, **settings):
    """Convert a trained adapter into a standard LoRA on the ORIGINAL base (rank 2r, or --max-rank)."""
    options = ConvertOptions.build(**settings)
    summary = stage.convert(trained, **options.kwargs(), progress=progress(as_json))
    print_summary(summary, as_json, f"converted {summary['modules']} modules into {summary['output']}")
    if as_json:
        return
    if options.dora is not None:
        if options.dora == "exact":
            click.echo(
                f"note: the base is NOT the original model: serve {summary['base']} with the LoRA {summary['adapter']}"
            )
        for m, e in sorted(summary.get("errors", {}).items()):
            click.echo(f"  error {m:<40} {e:.3e}")
        return
    print_trained_errors(summary, "the LoRA on the original")
    if "serve_command" in summary:
        click.echo(f"serve with: {summary['serve_command']}")
    elif summary.get("vllm_max_lora_rank"):
        click.echo(f"serve with vLLM using --max-lora-rank {summary['vllm_max_lora_rank']} (or larger)")
    name = {"vllm": "vLLM", "llama.cpp": "llama.cpp"}[summary["check_for"]]
    for finding in summary["check"]:
        click.echo(f"{name} check: {finding}")
    if not summary["check"]:
        click.echo(f"{name} check: passed")


@main.command()
@click.argument("base")
@click.argument("adapter", type=click.Path())
@from_options(MergeOptions, Report)
@fail_cleanly
def merge(base, adapter, as_json, quiet, **settings):
    """Merge ADAPTER into BASE (W + s·B·A in float32), streaming shard by shard.

    Under torchrun (as for decompose) rank 0 merges alone: a merged matrix costs less than sending it."""
    passive_openmp()
    options = MergeOptions.build(**settings)
    prehash(base, options.revision)
    summary = stage.merge(base, adapter, **options.kwargs(), progress=progress(quiet or as_json))
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        print_summary(summary, as_json, f"merged {summary['modules']} modules into {summary['output']}")
        if not as_json:
            print_trained_errors(summary, "the merged model")


@main.command("export-base")
@click.argument("residual", type=click.Path())
@from_options(ExportBaseOptions, Report)
@fail_cleanly
def export_base(residual, as_json, quiet, **settings):
    """Serve what was trained on a quantised residual (decompose --quantize nf4): write RESIDUAL re-quantised in the
    server's base format, and the adapter unchanged as its LoRA; print each re-quantised weight's error
    ‖dequant_server(W) − dequant_nf4(W)‖/‖dequant_nf4(W)‖. (vLLM also loads RESIDUAL as it is: --quantization
    bitsandbytes.)"""
    options = ExportBaseOptions.build(**settings)
    summary = stage.export_base(residual, **options.kwargs(), progress=progress(quiet or as_json))
    print_summary(summary, as_json, f"wrote the {options.server} base of {residual} into {summary['output']}")
    if not as_json:
        click.echo("‖dequant_server(W) − dequant_nf4(W)‖/‖dequant_nf4(W)‖ per re-quantised weight:")
        for m, e in summary["errors"].items():
            click.echo(
                f"  {m:<48} {e:.3e}"
                + (
                    " (float in the residual: fused with a quantised one)"
                    if m in summary.get("quantized_from_float", ())
                    else ""
                )
            )
        if "serve_command" in summary:
            click.echo(f"serve with: {summary['serve_command']}")


@main.command("export-gguf")
@click.argument("lora", type=click.Path())
@from_options(ExportGgufOptions, Report, skip=("quiet",))
@fail_cleanly
def export_gguf(lora, as_json, **settings):
    """Export LORA (a PEFT LoRA on the original base) as a llama.cpp LoRA adapter GGUF."""
    summary = stage.export_gguf(lora, **ExportGgufOptions.build(**settings).kwargs())
    print_summary({k: v for k, v in summary.items() if k != "types"}, as_json, f"wrote {summary['output']}")


@main.command()
@click.argument("lora", type=click.Path())
@from_options(CheckOptions, Report, skip=("quiet",))
@fail_cleanly
def check(lora, as_json, **settings):
    """Report every rule LORA breaks for vLLM, llama.cpp or PEFT, with what to do; exit 0 only if it passes.
    --for peft really loads the adapter with PEFT onto the base's architecture (no weights read)."""
    options = CheckOptions.build(**settings)
    findings = stage.check_adapter(lora, **options.kwargs())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "adapter": str(lora),
                    "for": options.target,
                    "passes": not findings,
                    "findings": [asdict(f) for f in findings],
                },
                indent=2,
            )
        )
    else:
        for f in findings:
            click.echo(f"fail {f}")
        click.echo(f"{lora}: {'passes' if not findings else f'{len(findings)} problem(s)'} for {options.target}")
    sys.exit(1 if findings else 0)


@main.command()
@click.argument("directory", type=click.Path())
@from_options(PushOptions, Report, skip=("quiet",))
@fail_cleanly
def push(directory, as_json, **settings):
    """Upload DIRECTORY to the Hub (token from HF_TOKEN or the HF cache; never printed), with a model card."""
    options = PushOptions.build(**settings)
    summary = stage.push(directory, **options.kwargs())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for f in summary["files"]:
        click.echo(f"{f['bytes']:>12,}  {f['path']}")
    if options.dry_run:
        click.echo("\n" + summary["card"])
        click.echo(f"dry run: nothing uploaded to {options.repo_id}")
    else:
        click.echo(f"uploaded to {summary['url']}")
