"""The `ailora-tools` group and what every command shares: one-line errors, progress, summaries."""

from __future__ import annotations

import errno
import json
import os
import sys
from functools import wraps

import click

from .. import __version__
from ..console import progress_enabled, quiet_libraries
from ..distributed import is_worker
from ..errors import AiloraError
from ..io.checkpoint import Checkpoint
from ..io.hashing import digest_async
from .flags import in_flags


class Group(click.Group):
    """Usage errors, like every other error, are one line on stderr with exit code 1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "ailora-tools"
            click.echo(f"error: {' '.join(e.format_message().split())} (see `{where} --help`)", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="ailora-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """SVD-initialised LoRA (AILoRA, PiSSA, MiLoRA, LoRA-DA, DoRA, ...): decompose a checkpoint into a frozen
    residual plus an initial adapter, train it, compare inits, convert it to a standard LoRA that vLLM and
    llama.cpp serve, merge, export and publish."""


def fail_cleanly(fn):
    """Turn library errors into one line on stderr and exit code 1 (a traceback only with --debug)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # `... | head`: the reader left; the work itself is done and nothing is wrong
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {' '.join(_one_line(e).split())}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun with --resume to finish the job", err=True)
            sys.exit(130)

    return wrapper


def _one_line(e: Exception) -> str:
    if isinstance(e, AiloraError):
        return in_flags(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"no space left on device{f' writing {e.filename}' if e.filename else ''}: free space or choose "
            "another output directory, then rerun with --resume (the output is incomplete: it has no manifest)"
        )
    if isinstance(e, OSError):
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return f"{e.__class__.__name__}: {e} (rerun with --debug for the traceback)"


def progress(quiet: bool) -> bool:
    """Progress bars unless --quiet (or --json); --quiet also silences the libraries' own bars and warnings."""
    if quiet:
        quiet_libraries()
    return progress_enabled(quiet)


def passive_openmp() -> None:
    """Streaming commands (decompose, merge): idle OpenMP threads sleep instead of spinning, unless
    OMP_WAIT_POLICY is set. The SVDs alternate with copy and hash threads, and on few cores spinning threads take
    their CPU (about 1.4 CPU-s of 7 on the 1.1B benchmark). Training keeps OpenMP's default: its many small ops
    pay a thread wake-up each when the threads sleep (a CPU train step took 1.5x as long). Before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prehash(model: str, revision: str | None) -> None:
    """Start hashing the checkpoint's files before torch loads (about 1.2 s); the run reuses the results.
    Ranks ≥ 1 of a torchrun launch hash nothing: rank 0 writes the manifest."""
    if is_worker():
        return
    try:
        for path in Checkpoint.open(model, revision=revision).files(fetch=False).values():  # Hub shards: as they arrive
            digest_async(path)
    except AiloraError:
        pass  # the run itself reports the problem


def print_summary(summary: dict, as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return
    click.echo(title)
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            click.echo(f"  {k:<22} {v}")


def print_trained_errors(summary: dict, what: str) -> None:
    """For an adapter trained on a quantised residual: each weight's error against the model that was trained."""
    if "trained_errors" not in summary:
        return
    click.echo(
        f"‖W − W_trained‖/‖W_trained‖ of {what} per weight (W_trained = dequant(Q) + s·B·A, the model trained "
        f"on {summary['quantized_residual']}):"
    )
    for m, e in summary["trained_errors"].items():
        click.echo(f"  {m:<48} {e:.3e}")
