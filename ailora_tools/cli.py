"""The `ailora-tools` command line: each command parses its options, calls the library, prints."""
from __future__ import annotations

import errno
import json
import os
import sys
from functools import wraps
from typing import NoReturn

import click

from . import __version__
from .console import logged_bars, one_line_warnings

# Idle OpenMP threads sleep instead of spinning: the SVDs alternate with copy and hash threads, and on few
# cores spinning threads take their CPU (about 1.4 CPU-s of 7 on the 1.1B benchmark). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
logged_bars()  # before anything imports tqdm (ailora_tools.init does): it reads its settings from the environment then
one_line_warnings()

from .errors import AiloraError  # noqa: E402
from .init import METHODS  # noqa: E402


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


def _prehash(model: str, revision: str | None) -> None:
    """Start hashing the checkpoint's files before torch loads (about 1.2 s); the run reuses the results.
    Ranks ≥ 1 of a torchrun launch hash nothing: rank 0 writes the manifest."""
    from .io.checkpoint import Checkpoint
    from .distributed import is_worker

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
                ctx.default_map = {**(ctx.default_map or {}), **load_recipe(value, section)}
            except AiloraError as e:
                raise click.BadParameter(str(e)) from e
        return value
    return click.option("--config", type=click.Path(), default=None, is_eager=True, expose_value=False,
                        callback=load, help=f"Recipe TOML whose [{section}] table sets defaults (flags override).")


@main.command()
@_config_option("decompose")
@click.argument("model", required=False)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (residual/, adapter/, ailora.json).")
@click.option("--method", type=click.Choice(list(METHODS)), default="ailora",
              help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".")
@click.option("--rank", type=int, default=16, help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: rank, so s = 1).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) instead of alpha/r.")
@click.option("--targets", default="q_proj,v_proj", help="Comma-separated module-name suffixes; aliases such as BERT's query/value are resolved.")
@click.option("--role", "roles", multiple=True, callback=_roles, help="NAME=principal|minor, repeatable; overrides the method's roles.")
@click.option("--svd", type=click.Choice(["exact", "randomized"]), default="randomized",
              help="Principal components: exact (converged to 1e-5·σ_max, float64 Gram fallback) or seeded randomized. Minor ones are always exact.")
@click.option("--niter", type=int, default=4, help="Randomized SVD power iterations.")
@click.option("--oversample", type=int, default=8, help="Randomized SVD oversampling (extra directions; also the exact method's block).")
@click.option("--seed", type=int, default=0, help="Seed for randomized SVD and Kaiming init.")
@click.option("--device", default="auto", help="Where SVDs run: auto, cpu, cuda, cuda:N.")
@click.option("--residual-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="dtype of residual target weights (default: the checkpoint's).")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--no-residual", is_flag=True,
              help="Write only the adapter, no residual: train then runs on the ORIGINAL model with s·B0·A0 "
                   "subtracted inside the adapter, so convert serves exactly what was trained (best for 16-bit "
                   "checkpoints); takes seconds on any model size.")
@click.option("--data", type=click.Path(), default=None,
              help='Calibration JSONL for data-aware methods (lora-da): {"text"}, {"prompt","completion"} or {"messages"}.')
@click.option("--samples", type=int, default=64, help="Calibration samples: the first N rows of --data.")
@click.option("--max-length", type=int, default=512, help="Longest calibration sample, in tokens (longer ones are refused).")
@_rewrite_options
@_fail_cleanly
def decompose(model, out, method, rank, alpha, rslora, targets, roles, svd, niter, oversample, seed, device,
              residual_dtype, revision, no_residual, data, samples, max_length, allow_pickle, overwrite, resume, as_json,
              quiet):
    """Decompose MODEL (local dir or Hub id) into OUT/residual + OUT/adapter, streaming shard by shard.

    Several GPUs or machines: `torchrun --nproc-per-node N -m ailora_tools.cli decompose ...`; each rank computes
    the factors of its share of the matrices, rank 0 writes the same bytes as one process."""
    if model is None:
        raise click.UsageError("missing MODEL (a model directory or Hub id), on the command line or as model= in --config")
    _prehash(model, revision)
    from .decomposition.pipeline import decompose as run

    summary = run(model, out, method=method, rank=rank, alpha=alpha, rslora=rslora,
                  targets=[t.strip() for t in targets.split(",") if t.strip()], roles=roles, svd=svd,
                  niter=niter, oversample=oversample, seed=seed, device=device, residual_dtype=residual_dtype,
                  revision=revision, allow_pickle=allow_pickle, no_residual=no_residual, data=data, samples=samples,
                  max_length=max_length, overwrite=overwrite, resume=resume, progress=_progress(quiet or as_json))
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        _print_summary(summary, as_json, f"decomposed {summary['modules']} modules into {summary['output']}")


@main.command()
@click.option("--trained", required=True, type=click.Path(), help="Adapter trained on the residual (ours or PEFT's PiSSA workflow).")
@click.option("--initial", type=click.Path(), default=None, help="Initial adapter (default: the one the trained adapter's manifest names).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory for the standard LoRA.")
@click.option("--max-rank", type=int, default=None, help="Re-compress each module to at most this rank (exact up to truncation; errors reported).")
@click.option("--tolerance", type=float, default=None, help="Fail if a module's relative Frobenius error exceeds this.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", help="dtype of the saved factors.")
@click.option("--base", default=None, help="Original model recorded as base_model_name_or_path (default: from the decompose manifest).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_fail_cleanly
def convert(trained, initial, out, max_rank, tolerance, dtype, base, overwrite, as_json):
    """Convert a trained adapter into a standard LoRA on the ORIGINAL base (rank 2r, or --max-rank)."""
    from .adapters.conversion import convert as run

    summary = run(trained, out, initial=initial, max_rank=max_rank, tolerance=tolerance, dtype=dtype, base=base,
                  overwrite=overwrite)
    _print_summary(summary, as_json, f"converted {summary['modules']} modules into {summary['output']}")
    if not as_json:
        click.echo(f"serve with vLLM using --max-lora-rank {summary['vllm_max_lora_rank']} (or larger)")
        for finding in summary["vllm_check"]:
            click.echo(f"vLLM check: {finding}")
        if not summary["vllm_check"]:
            click.echo("vLLM check: passed")


@main.command()
@click.argument("base")
@click.argument("adapter", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output model directory.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="dtype of merged weights (default: as stored).")
@click.option("--revision", default=None, help="Hub revision of BASE.")
@click.option("--force", is_flag=True, help="Use this base although its weights are not those the adapter's manifest records (a warning in the output's manifest).")
@_rewrite_options
@_fail_cleanly
def merge(base, adapter, out, dtype, revision, force, allow_pickle, overwrite, resume, as_json, quiet):
    """Merge ADAPTER into BASE (W + s·B·A in float32), streaming shard by shard.

    Under torchrun (as for decompose) rank 0 merges alone: a merged matrix costs less than sending it."""
    _prehash(base, revision)
    from .adapters.merging import merge as run

    summary = run(base, adapter, out, dtype=dtype, revision=revision, allow_pickle=allow_pickle, overwrite=overwrite,
                  resume=resume, progress=_progress(quiet or as_json), force=force)
    if "worker" not in summary:  # ranks ≥ 1 of a torchrun launch print nothing: rank 0 reports the run
        _print_summary(summary, as_json, f"merged {summary['modules']} modules into {summary['output']}")


@main.command()
@_config_option("train")
@click.option("--base", required=True, type=click.Path(),
              help="Frozen base: the residual model directory from decompose, or the ORIGINAL model for an adapter "
                   "from decompose --no-residual.")
@click.option("--adapter", required=True, type=click.Path(), help="Initial adapter (OUT/adapter from decompose).")
@click.option("--data", required=True, type=click.Path(),
              help='Training JSONL. Causal LM: {"text"}, {"prompt","completion"} or {"messages"}; masked LM: {"text"}; '
                   'sequence classification: {"text","label"} or {"text_a","text_b","label"}.')
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory for the trained adapter.")
@click.option("--eval-data", type=click.Path(), default=None, help="Evaluation JSONL (eval loss at the start, every --eval-every steps and at the end).")
@click.option("--epochs", type=int, default=1, help="Passes over the data (ignored when --max-steps is given).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to run.")
@click.option("--lr", type=float, default=2e-4, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, default=4, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=512, help="Tokens per example (longer ones are cut).")
@click.option("--warmup", type=int, default=0, help="Warm-up steps.")
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", help="Learning-rate schedule after warm-up.")
@click.option("--seed", type=int, default=0, help="Seed for data order and model-side randomness.")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (one is always saved at the end).")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", help="auto: bfloat16 autocast on CUDA, float32 on CPU.")
@click.option("--tokenizer", default=None, metavar="DIR_OR_HUB_ID", help="Tokenizer directory or Hub id, for a base without tokenizer files (default: the base's).")
@click.option("--progressive", type=click.IntRange(min=1), default=None, metavar="K",
              help="Progtuning: K stages of equal steps (one per epoch with --epochs K); stage k updates only the "
                   "blocks from part k up (lower blocks freeze first), and the backward pass stops there.")
@click.option("--adapter-base", type=click.Choice(["auto", "residual", "original"]), default="auto",
              help="auto: as decompose's manifest records. residual: train base + s·B·A. original: train "
                   "base + s(B·A − B0·A0) on the original model (exact).")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "masked-lm", "sequence-classification"]), default="auto",
              help="What to train for; auto: what the base was saved for (its config's architectures; a bare encoder: masked-lm).")
@click.option("--num-labels", type=int, default=None, help="Classes of a new classification head (default: from the labels).")
@click.option("--force", is_flag=True, help="Use this base although its weights are not those the adapter's manifest records (a warning in the output's manifest).")
@_output_options
@_fail_cleanly
def train(base, adapter, data, out, eval_data, epochs, max_steps, lr, batch_size, grad_accum, max_length, warmup,
          scheduler, seed, save_every, eval_every, resume, device, dtype, tokenizer, progressive, adapter_base,
          task, num_labels, force, overwrite, as_json, quiet):
    """Train the adapter on its frozen base (the residual, or the original model for --no-residual adapters);
    only the LoRA factors learn (and a classification head)."""
    from .training.trainer import train as run

    summary = run(base, adapter, data, out, eval_data=eval_data, epochs=epochs, max_steps=max_steps, lr=lr,
                  batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, warmup=warmup,
                  scheduler=scheduler, seed=seed, save_every=save_every, eval_every=eval_every, resume=resume,
                  device=device, dtype=dtype, tokenizer=tokenizer, progressive=progressive,
                  adapter_base=adapter_base, task=task, num_labels=num_labels, overwrite=overwrite,
                  progress=_progress(quiet or as_json), force=force)
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
@click.option("--force", is_flag=True, help="Use this base although its weights are not those the adapter's manifest records (a warning in the output's manifest).")
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
@click.option("--data", required=True, type=click.Path(), help="Training JSONL (as for train).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory: one subdirectory per run, compare.md/json, loss plots.")
@click.option("--eval-data", type=click.Path(), default=None, help="Evaluation JSONL (eval loss curve and final eval loss).")
@click.option("--methods", default=None, help="Comma-separated init methods [default: lora,pissa,milora,ailora, and lora-da when available].")
@click.option("--progressive", type=int, default=None, help="K: also run every method with progressive training (train --progressive K).")
@click.option("--target-loss", type=float, default=None, help="Loss for 'steps to reach' [default: the highest final loss among the runs].")
@click.option("--smooth", type=int, default=10, help="Training losses are a trailing mean over this many steps.")
@click.option("--rank", type=int, default=16, help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: rank).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r).")
@click.option("--targets", default="q_proj,v_proj", help="Comma-separated module-name suffixes.")
@click.option("--role", "roles", multiple=True, callback=_roles, help="NAME=principal|minor, repeatable; overrides the method's roles.")
@click.option("--svd", type=click.Choice(["exact", "randomized"]), default="randomized", help="Principal components: exact or seeded randomized.")
@click.option("--niter", type=int, default=4, help="Randomized SVD power iterations.")
@click.option("--oversample", type=int, default=8, help="Randomized SVD oversampling.")
@click.option("--seed", type=int, default=0, help="Seed for the SVDs, the Kaiming init, the data order and training.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N (SVDs and training).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps per run.")
@click.option("--epochs", type=int, default=1, help="Passes over the data (ignored when --max-steps is given).")
@click.option("--lr", type=float, default=2e-4, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, default=4, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=512, help="Tokens per example (longer ones are cut).")
@click.option("--warmup", type=int, default=0, help="Warm-up steps.")
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", help="Learning-rate schedule after warm-up.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps [default: a tenth of --max-steps].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps, so an interrupted run resumes from there.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", help="auto: bfloat16 autocast on CUDA, float32 on CPU.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub ids only).")
@click.option("--resume", is_flag=True, help="Finish an interrupted comparison: finished runs are kept, the interrupted one continues.")
@_output_options
@_fail_cleanly
def compare(model, data, out, eval_data, methods, progressive, target_loss, smooth, rank, alpha, rslora, targets, roles,
            svd, niter, oversample, seed, device, max_steps, epochs, lr, batch_size, grad_accum, max_length, warmup,
            scheduler, eval_every, save_every, dtype, revision, resume, overwrite, as_json, quiet):
    """Compare init methods on MODEL with the same data, steps and seed (decompose + train per method): a table of
    losses, steps to a target loss, time and trainable parameters, and loss-curve plots."""
    from .analysis.comparison import compare as run

    summary = run(model, data, out, eval_data=eval_data, progressive=progressive, target_loss=target_loss,
                  methods=None if methods is None else [m.strip() for m in methods.split(",") if m.strip()],
                  smooth=smooth, rank=rank, alpha=alpha, rslora=rslora,
                  targets=[t.strip() for t in targets.split(",") if t.strip()], roles=roles, svd=svd, niter=niter,
                  oversample=oversample, seed=seed, device=device, max_steps=max_steps, epochs=epochs, lr=lr,
                  batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, warmup=warmup,
                  scheduler=scheduler, eval_every=eval_every, save_every=save_every, dtype=dtype, revision=revision,
                  resume=resume, overwrite=overwrite, progress=_progress(quiet or as_json))
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
