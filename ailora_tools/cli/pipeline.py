"""decompose, train, demo, verify: the pipeline's commands."""

from __future__ import annotations

import json
import sys

import click

from .. import (  # their functions load torch on first use: after the hashing has started
    decomposition,
    training,
)
from ..distributed import is_worker
from ..options import DecomposeOptions, TrainOptions
from ..options.commands import (
    DemoOptions,
    OnBase,
    Report,
    Streams,
    VerifyOptions,
)
from .app import fail_cleanly, main, passive_openmp, prehash, print_summary, progress
from .flags import config_option, from_options, required_path


@main.command()
@config_option("decompose")
@click.argument("model", required=False)
@required_path("-o", "--out", help="Output directory (residual/, adapter/, ailora.json).")
@from_options(DecomposeOptions, Streams, Report)
@fail_cleanly
def decompose(model, out, overwrite, resume, as_json, quiet, **settings):
    """Decompose MODEL (local dir or Hub id) into OUT/residual + OUT/adapter, streaming shard by shard.

    Several GPUs or machines: `torchrun --nproc-per-node N -m ailora_tools.cli decompose ...`; each rank computes
    the factors of its share of the matrices, rank 0 writes the same bytes as one process."""
    if model is None:
        raise click.UsageError(
            "missing MODEL (a model directory or Hub id), on the command line or as model= in --config"
        )
    passive_openmp()
    options = DecomposeOptions.build(**settings)
    prehash(model, options.revision)
    summary = decomposition.decompose(
        model, out, options, overwrite=overwrite, resume=resume, progress=progress(quiet or as_json)
    )
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        print_summary(summary, as_json, f"decomposed {summary['modules']} modules into {summary['output']}")
        if summary.get("quant_error") and not as_json:
            click.echo("  quantisation error ‖W − (dequant(Q) + s·B·A)‖/‖W‖ over the targets:    mean      max")
            for row, e in summary["quant_error"].items():
                click.echo(f"    {row:<66} {e['mean']:.4f}   {e['max']:.4f}")


@main.command()
@config_option("train")
@required_path(
    "--base",
    help="Frozen base: the residual model directory from decompose, or the ORIGINAL model for an adapter "
    "from decompose --no-residual.",
)
@click.option(
    "--adapter",
    default=None,
    type=click.Path(),
    help="Initial adapter (OUT/adapter from decompose); not with --bitfit.",
)
@required_path(
    "--data",
    help='Training data: JSONL, CSV, TSV, Parquet or a datasets save_to_disk directory. Causal LM: {"text"}, '
    '{"prompt","completion"} or {"messages"}; masked LM: {"text"}; sequence classification: '
    '{"text","label"} or {"text_a","text_b","label"} (or --text-column, --text-pair-column, '
    "--label-column).",
)
@required_path("-o", "--out", help="Output directory for the trained adapter.")
@from_options(
    TrainOptions,
    Streams,
    OnBase,
    Report,
    skip=("allow_pickle",),
    help={"resume": "Continue from the latest checkpoint in OUT."},
)
@fail_cleanly
def train(base, adapter, data, out, resume, force, overwrite, as_json, quiet, **settings):
    """Train the adapter on its frozen base (the residual, or the original model for --no-residual adapters);
    only the LoRA factors learn (and a classification head). --bitfit: only the base's bias terms learn, no adapter.

    Several GPUs or machines: `torchrun --nproc-per-node N -m ailora_tools.cli train ...`; --batch-size is the
    micro-batch of all ranks together, each takes its slice, and rank 0 writes what one process would."""
    summary = training.train(
        base,
        adapter,
        data,
        out,
        TrainOptions.build(**settings),
        resume=resume,
        overwrite=overwrite,
        progress=progress(quiet or as_json) and not is_worker(),
        force=force,
    )
    if "worker" in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        return
    print_summary(summary, as_json, f"trained {summary['steps']} steps into {summary['output']}")
    if "progressive" in summary and not as_json:
        for s in summary["progressive"]["stages"]:
            click.echo(
                f"  stage {s['stage']}: blocks {s['blocks'][0]}-{s['blocks'][1]}, steps {s['steps'][0]}-"
                f"{s['steps'][1]}, {s['tokens_per_s']} tokens/s"
            )
        click.echo(
            f"  updated parameter-steps: {summary['progressive']['updated_parameter_fraction']:.1%} of plain training"
        )


@main.command()
@from_options(DemoOptions, Report, skip=("as_json",))
@fail_cleanly
def demo(quiet, **settings):
    """Run decompose → train → convert → merge on a built-in tiny model and check that all agree."""
    from ..demo import demo as run  # loads torch

    options = DemoOptions.build(**settings)
    rows = run(options.out, steps=options.steps, progress=progress(quiet))
    width = max(len(r["step"]) for r in rows)
    click.echo(f"\n{'step':<{width}}  {'seconds':>7}  {'check':<48}  output")
    for r in rows:
        mark = "ok" if r["ok"] else "FAILED"
        click.echo(f"{r['step']:<{width}}  {r['seconds']:>7.2f}  {r['check'] + ' ' + mark:<48}  {r['output']}")
    click.echo("all checks passed")


@main.command()
@click.argument("out", type=click.Path())
@from_options(VerifyOptions, Report, skip=("quiet",))
@fail_cleanly
def verify(out, as_json, **settings):
    """Check that OUT is complete, its files match the manifest, and (decompose) residual + adapter
    reconstruct the source. Exit 0 only when nothing is wrong."""
    from ..verify import verify as run  # loads torch

    report = run(out, reconstruction=not VerifyOptions.build(**settings).no_reconstruction)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{out}: {report['manifest'] or 'no manifest'}; {report['files_checked']} files and "
            f"{report['modules_checked']} modules checked"
        )
        for line in report["notes"]:
            click.echo(f"  note: {line}")
        for line in report["problems"]:
            click.echo(f"  problem: {line}")
        click.echo("ok" if not report["problems"] else f"{len(report['problems'])} problem(s)")
    sys.exit(1 if report["problems"] else 0)
