"""serve-check: an export served by the real server (vLLM, llama.cpp), compared with the trained model."""

from __future__ import annotations

import json
import sys

import click

from ..options.commands import Report, ServeCheckOptions
from .app import fail_cleanly, main
from .flags import from_options


@main.command("serve-check")
@click.argument("directory", type=click.Path())
@from_options(ServeCheckOptions, Report, skip=("quiet",))
@fail_cleanly
def serve_check(directory, as_json, **settings):
    """Serve DIRECTORY (a convert, convert --dora exact or export-base output, a merged model, a LoRA) with the real
    server on a few prompts and compare its log-probabilities with the trained model's in transformers (which the
    manifests name); print each prompt's worst difference; exit 1 above the tolerance. The server runs in its own
    environment (--python), as a subprocess."""
    from ..servers import serve_check as check

    options = ServeCheckOptions.build(**settings)
    summary = check(directory, **options.kwargs())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"served:  {summary['served']} ({summary['server']})")
        click.echo(f"trained: {summary['trained']}")
        for i, (n, worst) in enumerate(zip(summary["prompt_tokens"], summary["per_prompt"])):
            click.echo(f"  prompt {i} ({n} tokens): worst |Δ log p| {worst:.3e}")
        verdict = "passes" if summary["passes"] else "FAILS"
        click.echo(f"{directory}: {verdict}: worst {summary['worst']:.3e} (tolerance {summary['tolerance']:.1e})")
    sys.exit(0 if summary["passes"] else 1)
