"""The `ailora-tools` command line: each command parses its options, calls the library, prints."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from functools import wraps
from typing import NoReturn

import click

from . import __version__
from .console import logged_bars, no_hub_kernels, one_line_warnings

#: compare --metric choices (as analysis.comparison.METRICS, without importing it before torch is needed)
METRICS = ("auto", "loss", "accuracy", "f1", "matthews", "pearson", "spearman")

logged_bars()  # before anything imports tqdm (ailora_tools.init does): it reads its settings from the environment then
one_line_warnings()
no_hub_kernels()

from .errors import AiloraError  # noqa: E402
from .init import METHODS  # noqa: E402
from .options import DecomposeOptions, InitOptions, TrainOptions  # noqa: E402


def _progress(quiet: bool) -> bool:
    """Progress bars unless --quiet (or --json); --quiet also silences the libraries' own bars and warnings."""
    from .console import progress_enabled, quiet_libraries

    if quiet:
        quiet_libraries()
    return progress_enabled(quiet)


def _fail_cleanly(fn):
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
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on device{f' writing {e.filename}' if e.filename else ''}: free space or choose "
                "another output directory, then rerun with --resume (the output is incomplete: it has no manifest)")
    if isinstance(e, OSError):
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return f"{e.__class__.__name__}: {e} (rerun with --debug for the traceback)"


def _passive_openmp() -> None:
    """Streaming commands (decompose, merge): idle OpenMP threads sleep instead of spinning, unless
    OMP_WAIT_POLICY is set. The SVDs alternate with copy and hash threads, and on few cores spinning threads take
    their CPU (about 1.4 CPU-s of 7 on the 1.1B benchmark). Training keeps OpenMP's default: its many small ops
    pay a thread wake-up each when the threads sleep (a CPU train step took 1.5x as long). Before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _prehash(model: str, revision: str | None) -> None:
    """Start hashing the checkpoint's files before torch loads (about 1.2 s); the run reuses the results.
    Ranks ≥ 1 of a torchrun launch hash nothing: rank 0 writes the manifest."""
    from .distributed import is_worker
    from .io.checkpoint import Checkpoint

    if is_worker():
        return
    from .io.hashing import digest_async

    try:
        for path in Checkpoint.open(model, revision=revision).files(fetch=False).values():  # Hub shards: as they arrive
            digest_async(path)
    except AiloraError:
        pass  # the run itself reports the problem


def _print_summary(summary: dict, as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return
    click.echo(title)
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            click.echo(f"  {k:<22} {v}")


class _Group(click.Group):
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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="ailora-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """AILoRA / PiSSA / MiLoRA tooling: decompose a checkpoint into a frozen residual plus an
    initial adapter, train it, convert it to a standard LoRA, merge, export and publish."""


def _output_options(fn):
    """--overwrite, --json and --quiet: what every command that writes an output directory takes."""
    for option in reversed([
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]):
        fn = option(fn)
    return fn


#: train, merge, export-gguf: a base whose fingerprints are not those the adapter's manifest records (`manifests`)
_force_option = click.option("--force", is_flag=True, help="Use this base although its weights are not those the "
                             "adapter's manifest records (a warning in the output's manifest).")


def _rewrite_options(fn):
    """The options every command that rewrites a checkpoint shares."""
    fn = _output_options(fn)
    fn = click.option("--resume", is_flag=True, help="Finish an interrupted run in the same output directory.")(fn)
    return click.option("--allow-pickle", is_flag=True,
                        help="Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")(fn)


def _roles(_ctx, _param, values) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, role = v.partition("=")
        if not sep or not name or not role:
            raise click.BadParameter(f"{v!r}: expected NAME=principal|minor, e.g. k_proj=principal")
        out[name] = role
    return out


def _config_option(section: str):
    """--config FILE: a recipe's [section] table becomes the command's defaults; explicit flags win."""
    def load(ctx, _param, value):
        if value is not None:
            from .config import load_recipe

            try:
                table = load_recipe(value, section)
            except AiloraError as e:
                raise click.BadParameter(str(e)) from e
            unknown = sorted(set(table) - {p.name for p in ctx.command.params} - {"model"})
            if unknown:
                raise click.BadParameter(f"{value}: [{section}] has no option {', '.join(unknown)} (see `ailora-tools "
                                         f"{section} --help`)")
            ctx.default_map = {**(ctx.default_map or {}), **table}
        return value
    return click.option("--config", type=click.Path(), default=None, is_eager=True, expose_value=False,
                        callback=load, help=f"Recipe TOML whose [{section}] table sets defaults (flags override).")


def _from_options(*classes, skip: tuple[str, ...] = (), help: dict[str, str] | None = None):
    """Click options generated from option dataclasses (`options.py`): one per field, first class first.

    The field's type gives the option's: bool a flag, a tuple a comma-separated list, a dict a repeatable NAME=VALUE,
    choices a click.Choice. `skip` leaves fields out; `help` replaces a field's help text for this command.
    """
    import typing

    from .options import flag

    seen, decorators = set(skip), []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = cls.defaults()[f.name]
            kwargs = {"default": default, "help": (help or {}).get(f.name, f.metadata["help"]),
                      "metavar": f.metadata.get("metavar")}
            kind = typing.get_origin(hints[f.name])
            base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            if hints[f.name] is bool:
                kwargs.update(is_flag=True)
            elif kind is tuple:
                kwargs.update(default=",".join(default), callback=_comma_list)
            elif kind is dict:
                kwargs.update(default=(), multiple=True, callback=_roles, show_default=False)
            elif f.metadata.get("choices"):
                kwargs.update(type=click.Choice(list(f.metadata["choices"])))
            else:
                kwargs.update(type=base[0])
            if f.name == "method":
                kwargs.update(type=click.Choice(list(METHODS)),
                              help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".")
            decorators.append(click.option(f.metadata.get("cli") or flag(f.name), f.name, **kwargs))

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


def _comma_list(_ctx, _param, value) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip()) if isinstance(value, str) else tuple(value)


def _split(cls, kwargs: dict):
    """The fields of option dataclass `cls` taken out of a command's keyword arguments, as one object."""
    return cls.build(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


@main.command()
@_config_option("decompose")
@click.argument("model", required=False)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (residual/, adapter/, ailora.json).")
@_from_options(DecomposeOptions, skip=("allow_pickle",))  # --allow-pickle: with --resume below
@_rewrite_options
@_fail_cleanly
def decompose(model, out, allow_pickle, overwrite, resume, as_json, quiet, **settings):
    """Decompose MODEL (local dir or Hub id) into OUT/residual + OUT/adapter, streaming shard by shard.

    Several GPUs or machines: `torchrun --nproc-per-node N -m ailora_tools.cli decompose ...`; each rank computes
    the factors of its share of the matrices, rank 0 writes the same bytes as one process."""
    if model is None:
        raise click.UsageError("missing MODEL (a model directory or Hub id), on the command line or as model= in --config")
    _passive_openmp()
    options = DecomposeOptions.build(allow_pickle=allow_pickle, **settings)
    _prehash(model, options.revision)
    from .decomposition import decompose as run

    summary = run(model, out, options, overwrite=overwrite, resume=resume, progress=_progress(quiet or as_json))
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        _print_summary(summary, as_json, f"decomposed {summary['modules']} modules into {summary['output']}")
        if summary.get("quant_error") and not as_json:
            click.echo("  quantisation error ‖W − (dequant(Q) + s·B·A)‖/‖W‖ over the targets:    mean      max")
            for row, e in summary["quant_error"].items():
                click.echo(f"    {row:<66} {e['mean']:.4f}   {e['max']:.4f}")


@main.command()
@click.option("--trained", required=True, type=click.Path(), help="Adapter trained on the residual (ours or PEFT's PiSSA workflow); with --for, also a LoRA already on the original model (converted, plain PEFT).")
@click.option("--initial", type=click.Path(), default=None, help="Initial adapter (default: the one the trained adapter's manifest names).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory for the standard LoRA.")
@click.option("--max-rank", type=int, default=None, help="Re-compress each module to at most this rank (exact up to truncation; errors reported).")
@click.option("--tolerance", type=float, default=None, help="Fail if a module's relative Frobenius error exceeds this.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", help="dtype of the saved factors.")
@click.option("--base", default=None, help="Original model recorded as base_model_name_or_path (default: from the decompose manifest).")
@click.option("--for", "server", type=click.Choice(["vllm", "llama.cpp"]), default=None,
              help="Export as that server takes it: scale baked into B (lora_alpha = r, no rsLoRA), one rank it accepts "
                   "(zero-padded; re-compressed above --max-lora-rank), heads and biases refused with what to do.")
@click.option("--max-lora-rank", type=int, default=None, help="With --for vllm: the server's --max-lora-rank (1, 8, 16, 32, 64, 128, 256, 320, 512) [default: 512].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--dora", "dora", type=click.Choice(["exact", "approximate"]), default=None,
              help="For a DoRA adapter: exact writes OUT/base (adapted matrices rescaled, not the original) + "
                   "OUT/adapter; approximate writes a LoRA on the original from a truncated SVD (--max-rank and/or "
                   "--tolerance), its per-module error measured.")
@click.option("--accept-error", is_flag=True,
              help="With --dora approximate: write the LoRA even where a module's error is above --tolerance.")
@_fail_cleanly
def convert(trained, initial, out, max_rank, tolerance, dtype, base, server, max_lora_rank, overwrite, as_json, dora,
            accept_error):
    """Convert a trained adapter into a standard LoRA on the ORIGINAL base (rank 2r, or --max-rank)."""
    from .adapters.conversion import convert as run

    summary = run(trained, out, initial=initial, max_rank=max_rank, tolerance=tolerance, dtype=dtype, base=base,
                  overwrite=overwrite, server=server, max_lora_rank=max_lora_rank, dora=dora, accept_error=accept_error,
                  progress=_progress(as_json))
    _print_summary(summary, as_json, f"converted {summary['modules']} modules into {summary['output']}")
    if not as_json and dora is not None:
        if dora == "exact":
            click.echo(f"note: the base is NOT the original model: serve {summary['base']} with the LoRA "
                       f"{summary['adapter']}")
        for m, e in sorted(summary.get("errors", {}).items()):
            click.echo(f"  error {m:<40} {e:.3e}")
        return
    if not as_json:
        _print_trained_errors(summary, "the LoRA on the original")
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
@click.option("-o", "--out", required=True, type=click.Path(), help="Output model directory.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="dtype of merged weights (default: as stored).")
@click.option("--revision", default=None, help="Hub revision of BASE.")
@_force_option
@_rewrite_options
@_fail_cleanly
def merge(base, adapter, out, dtype, revision, force, allow_pickle, overwrite, resume, as_json, quiet):
    """Merge ADAPTER into BASE (W + s·B·A in float32), streaming shard by shard.

    Under torchrun (as for decompose) rank 0 merges alone: a merged matrix costs less than sending it."""
    _passive_openmp()
    _prehash(base, revision)
    from .adapters.merging import merge as run

    summary = run(base, adapter, out, dtype=dtype, revision=revision, allow_pickle=allow_pickle, overwrite=overwrite,
                  resume=resume, progress=_progress(quiet or as_json), force=force)
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        _print_summary(summary, as_json, f"merged {summary['modules']} modules into {summary['output']}")
        if not as_json:
            _print_trained_errors(summary, "the merged model")


def _print_trained_errors(summary: dict, what: str) -> None:
    """For an adapter trained on a quantised residual: each weight's error against the model that was trained."""
    if "trained_errors" not in summary:
        return
    click.echo(f"‖W − W_trained‖/‖W_trained‖ of {what} per weight (W_trained = dequant(Q) + s·B·A, the model trained "
               f"on {summary['quantized_residual']}):")
    for m, e in summary["trained_errors"].items():
        click.echo(f"  {m:<48} {e:.3e}")


@main.command("export-base")
@click.argument("residual", type=click.Path())
@click.option("--for", "server", required=True, type=click.Choice(["vllm", "llama.cpp"]),
              help="vllm: compressed-tensors W4A16 pack-quantized (OUT/base, OUT/adapter); llama.cpp: a GGUF "
                   "(OUT/base.gguf, OUT/adapter.gguf).")
@click.option("--format", "fmt", type=click.Choice(["w4a16", "q4_0", "q8_0"]), default=None,
              help="The base's weight format: w4a16 for vllm; q4_0 or q8_0 for llama.cpp [default: w4a16 / q4_0].")
@click.option("--adapter", type=click.Path(), default=None,
              help="The adapter trained on RESIDUAL: written beside the base as the server takes it.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory.")
@_output_options
@_fail_cleanly
def export_base(residual, server, fmt, adapter, out, overwrite, as_json, quiet):
    """Serve what was trained on a quantised residual (decompose --quantize nf4): write RESIDUAL re-quantised in the
    server's base format, and the adapter unchanged as its LoRA; print each re-quantised weight's error
    ‖dequant_server(W) − dequant_nf4(W)‖/‖dequant_nf4(W)‖. (vLLM also loads RESIDUAL as it is: --quantization
    bitsandbytes.)"""
    from .adapters.server_base import export_base as run

    summary = run(residual, out, server=server, fmt=fmt, adapter=adapter, overwrite=overwrite,
                  progress=_progress(quiet or as_json))
    _print_summary(summary, as_json, f"wrote the {server} base of {residual} into {summary['output']}")
    if not as_json:
        click.echo("‖dequant_server(W) − dequant_nf4(W)‖/‖dequant_nf4(W)‖ per re-quantised weight:")
        for m, e in summary["errors"].items():
            click.echo(f"  {m:<48} {e:.3e}" + (" (float in the residual: fused with a quantised one)"
                                               if m in summary.get("quantized_from_float", ()) else ""))
        if "serve_command" in summary:
            click.echo(f"serve with: {summary['serve_command']}")


@main.command()
@_config_option("train")
@click.option("--base", required=True, type=click.Path(),
              help="Frozen base: the residual model directory from decompose, or the ORIGINAL model for an adapter "
                   "from decompose --no-residual.")
@click.option("--adapter", default=None, type=click.Path(), help="Initial adapter (OUT/adapter from decompose); not with --bitfit.")
@click.option("--data", required=True, type=click.Path(),
              help='Training data: JSONL, CSV, TSV, Parquet or a datasets save_to_disk directory. Causal LM: {"text"}, '
                   '{"prompt","completion"} or {"messages"}; masked LM: {"text"}; sequence classification: '
                   '{"text","label"} or {"text_a","text_b","label"} (or --text-column, --text-pair-column, '
                   '--label-column).')
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory for the trained adapter.")
@_from_options(TrainOptions)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.")
@_force_option
@_output_options
@_fail_cleanly
def train(base, adapter, data, out, resume, force, overwrite, as_json, quiet, **settings):
    """Train the adapter on its frozen base (the residual, or the original model for --no-residual adapters);
    only the LoRA factors learn (and a classification head). --bitfit: only the base's bias terms learn, no adapter.

    Several GPUs or machines: `torchrun --nproc-per-node N -m ailora_tools.cli train ...`; --batch-size is the
    micro-batch of all ranks together, each takes its slice, and rank 0 writes what one process would."""
    from .distributed import is_worker
    from .training import train as run

    summary = run(base, adapter, data, out, TrainOptions.build(**settings), resume=resume, overwrite=overwrite,
                  progress=_progress(quiet or as_json) and not is_worker(), force=force)
    if "worker" in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        return
    _print_summary(summary, as_json, f"trained {summary['steps']} steps into {summary['output']}")
    if "progressive" in summary and not as_json:
        for s in summary["progressive"]["stages"]:
            click.echo(f"  stage {s['stage']}: blocks {s['blocks'][0]}-{s['blocks'][1]}, steps {s['steps'][0]}-"
                       f"{s['steps'][1]}, {s['tokens_per_s']} tokens/s")
        click.echo(f"  updated parameter-steps: {summary['progressive']['updated_parameter_fraction']:.1%} of plain training")


@main.command()
@click.option("-o", "--out", type=click.Path(), default="ailora-demo", help="Directory for every step's output.")
@click.option("--steps", type=int, default=300, help="Training steps.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def demo(out, steps, quiet):
    """Run decompose → train → convert → merge on a built-in tiny model and check that all agree."""
    from .demo import demo as run

    rows = run(out, steps=steps, progress=_progress(quiet))
    width = max(len(r["step"]) for r in rows)
    click.echo(f"\n{'step':<{width}}  {'seconds':>7}  {'check':<48}  output")
    for r in rows:
        mark = "ok" if r["ok"] else "FAILED"
        click.echo(f"{r['step']:<{width}}  {r['seconds']:>7.2f}  {r['check'] + ' ' + mark:<48}  {r['output']}")
    click.echo("all checks passed")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--no-reconstruction", is_flag=True, help="Only check completeness and hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_fail_cleanly
def verify(out, no_reconstruction, as_json):
    """Check that OUT is complete, its files match the manifest, and (decompose) residual + adapter
    reconstruct the source. Exit 0 only when nothing is wrong."""
    from .verify import verify as run

    report = run(out, reconstruction=not no_reconstruction)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{out}: {report['manifest'] or 'no manifest'}; {report['files_checked']} files and "
                   f"{report['modules_checked']} modules checked")
        for line in report["notes"]:
            click.echo(f"  note: {line}")
        for line in report["problems"]:
            click.echo(f"  problem: {line}")
        click.echo("ok" if not report["problems"] else f"{len(report['problems'])} problem(s)")
    sys.exit(1 if report["problems"] else 0)


@main.command("export-gguf")
@click.argument("lora", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="Original base model directory (only config.json is read).")
@click.option("-o", "--out", required=True, type=click.Path(), help="The .gguf file to write.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", help="Tensor type (q8_0 where rows are multiples of 32, else f16).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@_force_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_fail_cleanly
def export_gguf(lora, base, out, outtype, overwrite, force, as_json):
    """Export LORA (a PEFT LoRA on the original base) as a llama.cpp LoRA adapter GGUF."""
    from .adapters.gguf_export import export_gguf as run

    summary = run(lora, base, out, outtype=outtype, overwrite=overwrite, force=force)
    _print_summary({k: v for k, v in summary.items() if k != "types"}, as_json, f"wrote {summary['output']}")


@main.command()
@click.argument("lora", type=click.Path())
@click.option("--for", "target", type=click.Choice(["vllm", "llama.cpp", "peft"]), default="vllm", help="Where the adapter will be loaded.")
@click.option("--max-lora-rank", type=int, default=16, help="The vLLM server's --max-lora-rank.")
@click.option("--base", type=click.Path(), default=None, help="Base model directory (needed --for llama.cpp; --for peft: default base_model_name_or_path).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@_fail_cleanly
def check(lora, target, max_lora_rank, base, as_json):
    """Report every rule LORA breaks for vLLM, llama.cpp or PEFT, with what to do; exit 0 only if it passes.
    --for peft really loads the adapter with PEFT onto the base's architecture (no weights read)."""
    from dataclasses import asdict

    from .adapters.check import check_adapter

    findings = check_adapter(lora, target=target, max_lora_rank=max_lora_rank, base=base)
    if as_json:
        click.echo(json.dumps({"adapter": str(lora), "for": target, "passes": not findings,
                               "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        for f in findings:
            click.echo(f"fail {f}")
        click.echo(f"{lora}: {'passes' if not findings else f'{len(findings)} problem(s)'} for {target}")
    sys.exit(1 if findings else 0)


@main.command()
@click.argument("directory", type=click.Path())
@click.option("--repo-id", required=True, help="Hub repo, e.g. me/llama31-ailora.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to upload to.")
@click.option("--commit-message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, with sizes, and the model card; upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_fail_cleanly
def push(directory, repo_id, private, revision, commit_message, dry_run, as_json):
    """Upload DIRECTORY to the Hub (token from HF_TOKEN or the HF cache; never printed), with a model card."""
    from .adapters.hub import push as run

    summary = run(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                  dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for f in summary["files"]:
        click.echo(f"{f['bytes']:>12,}  {f['path']}")
    if dry_run:
        click.echo("\n" + summary["card"])
        click.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        click.echo(f"uploaded to {summary['url']}")


@main.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (spectrum.json, spectra.safetensors, PNG plots).")
@click.option("--targets", default="q_proj,v_proj", help="Comma-separated module-name suffixes; aliases such as BERT's query/value are resolved.")
@click.option("--rank", type=int, default=16, help="r: energy in the top-r and bottom-r directions, σ at their edges.")
@click.option("--adapter", type=click.Path(), default=None, help="A trained adapter: adds ‖ΔW‖_F per layer.")
@click.option("--initial", type=click.Path(), default=None, help="Its initial adapter (default: the one its ailora-train.json names; none: ΔW = s·BA).")
@click.option("--plot-layers", type=int, default=4, help="Layers shown in spectra.png (evenly spaced).")
@click.option("--device", default="auto", help="Where the eigenvalues are computed: auto, cpu, cuda, cuda:N.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")
@_output_options
@_fail_cleanly
def spectrum(model, out, targets, rank, adapter, initial, plot_layers, device, revision, allow_pickle, overwrite,
             as_json, quiet):
    """Singular-value spectra of MODEL's target matrices per layer (W^Q vs W^V), streamed one matrix at a time;
    with --adapter, the size of the trained update per layer."""
    from .analysis.spectra import spectrum as run

    summary = run(model, out, targets=[t.strip() for t in targets.split(",") if t.strip()], rank=rank,
                  adapter=adapter, initial=initial, plot_layers=plot_layers, device=device, revision=revision,
                  allow_pickle=allow_pickle, overwrite=overwrite, progress=_progress(quiet or as_json))
    _print_summary(summary, as_json, f"spectra of {summary['modules']} modules in {summary['output']}")
    if not as_json:
        width = max(len(r["module"]) for r in summary["rows"])
        click.echo(f"\n{'module':<{width}}  {'σ_max':>9}  {'top-r':>7}  {'bottom-r':>9}  {'‖ΔW‖_F':>9}")
        for r in summary["rows"]:
            delta = "" if r["delta_fro"] is None else f"{r['delta_fro']:.4g}"
            click.echo(f"{r['module']:<{width}}  {r['sigma_max']:>9.4g}  {r['energy_top']:>7.2%}  "
                       f"{r['energy_bottom']:>9.3%}  {delta:>9}")


@main.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="Training data (as for train: JSONL, CSV, TSV, Parquet, a datasets directory).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory: one subdirectory per run, compare.md/json, plots.")
@click.option("--methods", default=None, help="Comma-separated init methods; also bitfit (train --bitfit, no decompose), dora (plain DoRA) and METHOD+dora [default: lora,pissa,milora,ailora, and lora-da when available and the task is causal-lm].")
@click.option("--progressive", type=int, default=None, help="K: also run every method with progressive training (train --progressive K).")
@click.option("--target-loss", type=float, default=None, help="Loss for 'steps to reach' [default: the highest final loss among the runs].")
@click.option("--smooth", type=int, default=10, help="Training losses are a trailing mean over this many steps.")
@click.option("--lr", "lr", default=None, metavar="RATES",
              help="Learning rate(s): 2e-4; a sweep 1e-4,5e-4,2e-3 (every method runs each, the best on eval is "
                   "its rate; all in compare.json); per method pissa=1e-4,lora=5e-4 [default: 2e-4].")
@click.option("--seeds", default=None, metavar="S,S,...",
              help="Run every method with each seed (SVDs, init, data order); tables show mean ± std [default: --seed].")
@click.option("--metric", type=click.Choice(list(METRICS)), default="auto",
              help="Chooses each method's rate and the target of 'steps to reach': auto = accuracy for "
                   "classification, pearson for regression (--num-labels 1), loss otherwise.")
@click.option("--target-metric", type=float, default=None,
              help="Value of --metric for 'steps to reach' [default: the worst final value among the methods].")
@_from_options(InitOptions, TrainOptions, skip=("method", "dora", "progressive", "bitfit", "lr"),
               help={"seed": "Seed for the SVDs, the Kaiming init, the data order and training.",
                     "device": "auto, cpu, cuda, cuda:N (SVDs and training).",
                     "eval_every": "Evaluate every N steps [default: a tenth of --max-steps]."})
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--resume", is_flag=True, help="Finish an interrupted comparison: finished runs are kept, the interrupted one continues.")
@_output_options
@_fail_cleanly
def compare(model, data, out, methods, progressive, target_loss, smooth, lr, seeds, metric, target_metric, revision,
            resume, overwrite, as_json, quiet, **settings):
    """Compare init methods on MODEL with the same data, steps and seeds (decompose + train per method, seed and
    learning rate): a table of losses and metrics (mean ± std over seeds), steps to a target, time and trainable
    parameters, and plots against step."""
    from .comparison import compare as run

    init, training = _split(InitOptions, dict(settings)), _split(TrainOptions, dict(settings))
    summary = run(model, data, out, methods=None if methods is None else [m.strip() for m in methods.split(",") if m.strip()],
                  progressive=progressive, target_loss=target_loss, smooth=smooth, seeds=seeds, metric=metric,
                  target_metric=target_metric, init=init, training=training, revision=revision, resume=resume,
                  overwrite=overwrite, progress=_progress(quiet or as_json), **({} if lr is None else {"lr": lr}))
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        click.echo(open(summary["report"], encoding="utf-8").read())
        click.echo(f"written to {summary['output']}")


def exit_now(code: int) -> NoReturn:
    """Exit without interpreter teardown: torch's alone takes about 0.3 s, and every file is closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The `ailora-tools` console entry point: `main`, then `exit_now` with its exit code."""
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            exit_now(e.code or 0)
        raise


if __name__ == "__main__":
    run()
