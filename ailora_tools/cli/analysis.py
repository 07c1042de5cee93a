"""spectrum, compare: measuring models and methods."""

from __future__ import annotations

import json

import click

from .. import analysis, comparison  # their functions load torch on first use
from ..options import InitOptions, TrainOptions
from ..options.commands import CompareOptions, Report, SpectrumOptions
from .app import fail_cleanly, main, print_summary, progress
from .flags import from_options, split


@main.command()
@click.argument("model")
@from_options(SpectrumOptions, Report)
@fail_cleanly
def spectrum(model, as_json, quiet, **settings):
    """Singular-value spectra of MODEL's target matrices per layer (W^Q vs W^V), streamed one matrix at a time;
    with --adapter, the size of the trained update per layer."""
    options = SpectrumOptions.build(**settings)
    summary = analysis.spectrum(
        model, **{**options.kwargs(), "targets": list(options.targets)}, progress=progress(quiet or as_json)
    )
    print_summary(summary, as_json, f"spectra of {summary['modules']} modules in {summary['output']}")
    if not as_json:
        width = max(len(r["module"]) for r in summary["rows"])
        click.echo(f"\n{'module':<{width}}  {'σ_max':>9}  {'top-r':>7}  {'bottom-r':>9}  {'‖ΔW‖_F':>9}")
        for r in summary["rows"]:
            delta = "" if r["delta_fro"] is None else f"{r['delta_fro']:.4g}"
            click.echo(
                f"{r['module']:<{width}}  {r['sigma_max']:>9.4g}  {r['energy_top']:>7.2%}  "
                f"{r['energy_bottom']:>9.3%}  {delta:>9}"
            )


@main.command()
@click.argument("model")
@from_options(
    CompareOptions,
    InitOptions,
    TrainOptions,
    Report,
    skip=("method", "dora", "bitfit"),
    help={
        "seed": "Seed for the SVDs, the Kaiming init, the data order and training.",
        "device": "auto, cpu, cuda, cuda:N (SVDs and training).",
        "eval_every": "Evaluate every N steps [default: a tenth of --max-steps].",
    },
)
@fail_cleanly
def compare(model, as_json, quiet, **settings):
    """Compare init methods on MODEL with the same data, steps and seeds (decompose + train per method, seed and
    learning rate): a table of losses and metrics (mean ± std over seeds), steps to a target, time and trainable
    parameters, and plots against step."""
    o = split(CompareOptions, settings)  # first: its lr (rates) and progressive are not TrainOptions'
    init, training = split(InitOptions, dict(settings)), split(TrainOptions, dict(settings))
    settings = {k: v for k, v in o.kwargs().items() if k not in ("data", "out", "methods") and (k != "lr" or v)}
    methods = None if o.methods is None else [m.strip() for m in o.methods.split(",") if m.strip()]
    summary = comparison.compare(
        model,
        o.data,
        o.out,
        methods=methods,
        init=init,
        training=training,
        progress=progress(quiet or as_json),
        **settings,
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    elif o.dry_run:
        click.echo(summary["plan"] + "; nothing run (--dry-run)")
    else:
        click.echo(open(summary["report"], encoding="utf-8").read())
        click.echo(f"written to {summary['output']}")
