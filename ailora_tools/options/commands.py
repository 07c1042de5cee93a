"""The settings of every command besides decompose and train, one dataclass each, named for the library function
they are the keyword arguments of (`convert(trained, **ConvertOptions(...).kwargs())`), and the choices they take.

Positional arguments of a function (the adapter, the model) stay the commands' arguments; output and run flags
shared by several commands are small bases (`Writes`, `Streams`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..io.tensorio import DTYPE_FLAGS
from .fields import Options, option

DTYPES = tuple(DTYPE_FLAGS)  # float32, float16, bfloat16
#: servers `convert --for` exports to (`adapters.serving`)
SERVERS = ("vllm", "llama.cpp")
#: where `check --for` checks an adapter will load
CHECK_TARGETS = (*SERVERS, "peft")
#: the --max-lora-rank values a vLLM server accepts
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: `export-gguf --outtype`: the tensor types llama.cpp's LoRA GGUF takes
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: `export-base --format` per server (the first is the default)
SERVER_FORMATS = {"vllm": ("w4a16",), "llama.cpp": ("q4_0", "q8_0")}
#: `convert --dora`
DORA_MODES = ("exact", "approximate")
CLASSIFICATION = ("accuracy", "f1", "matthews")
REGRESSION = ("pearson", "spearman")
#: `compare --metric`
METRICS = ("auto", "loss", *CLASSIFICATION, *REGRESSION)


@dataclass
class Report(Options):
    """How a command prints (not passed to the library)."""

    as_json: bool = option(False, "Print the result as JSON.", cli="--json")
    quiet: bool = option(False, "No progress bars; also silences the libraries' own bars and warnings.")


@dataclass
class Writes(Options):
    """A command that writes an output directory."""

    overwrite: bool = option(False, "Replace a non-empty output (directory or file).")


@dataclass
class Streams(Writes):
    """A command that rewrites a checkpoint shard by shard."""

    resume: bool = option(False, "Finish an interrupted run in the same output directory.")
    allow_pickle: bool = option(False, "Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")


@dataclass
class OnBase(Options):
    """A command that puts an adapter on a base whose fingerprints its manifest records (`manifests.check_base`)."""

    force: bool = option(
        False,
        "Use this base although its weights are not those the adapter's manifest records "
        "(a warning in the output's manifest).",
    )


@dataclass
class ConvertOptions(Writes):
    """`convert`: a trained adapter to a standard LoRA on the original base."""

    out: str | None = option(None, "Output directory for the standard LoRA.", short="-o", required=True)
    initial: str | None = option(None, "Initial adapter (default: the one the trained adapter's manifest names).")
    max_rank: int | None = option(
        None, "Re-compress each module to at most this rank (exact up to truncation; errors reported)."
    )
    tolerance: float | None = option(None, "Fail if a module's relative Frobenius error exceeds this.")
    dtype: str = option("float32", "dtype of the saved factors.", choices=DTYPES)
    base: str | None = option(
        None, "Original model recorded as base_model_name_or_path (default: from the decompose manifest)."
    )
    server: str | None = option(
        None,
        "Export as that server takes it: scale baked into B (lora_alpha = r, no "
        "rsLoRA), one rank it accepts (zero-padded; re-compressed above --max-lora-rank), "
        "heads and biases refused with what to do.",
        choices=SERVERS,
        cli="--for",
    )
    max_lora_rank: int | None = option(
        None,
        f"With --for vllm: the server's --max-lora-rank ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}) [default: 512].",
    )
    dora: str | None = option(
        None,
        "For a DoRA adapter: exact writes OUT/base (adapted matrices rescaled, not the "
        "original) + OUT/adapter; approximate writes a LoRA on the original from a truncated "
        "SVD (--max-rank and/or --tolerance), its per-module error measured.",
        choices=DORA_MODES,
    )
    accept_error: bool = option(
        False, "With --dora approximate: write the LoRA even where a module's error is above --tolerance."
    )


@dataclass
class MergeOptions(Streams, OnBase):
    """`merge`: an adapter (or trained biases) into its base."""

    out: str | None = option(None, "Output model directory.", short="-o", required=True)
    dtype: str | None = option(None, "dtype of merged weights (default: as stored).", choices=DTYPES)
    revision: str | None = option(None, "Hub revision of BASE.")


@dataclass
class ExportGgufOptions(Writes, OnBase):
    """`export-gguf`: a LoRA on the original base as a llama.cpp LoRA GGUF."""

    base: str | None = option(None, "Original base model directory (only config.json is read).", required=True)
    out: str | None = option(None, "The .gguf file to write.", short="-o", required=True)
    outtype: str = option("f32", "Tensor type (q8_0 where rows are multiples of 32, else f16).", choices=OUTTYPES)


@dataclass
class ExportBaseOptions(Writes):
    """`export-base`: a quantised residual re-quantised in a server's base format, with its adapter."""

    server: str | None = option(
        None,
        "vllm: compressed-tensors W4A16 pack-quantized (OUT/base, OUT/adapter); "
        "llama.cpp: a GGUF (OUT/base.gguf, OUT/adapter.gguf).",
        choices=tuple(SERVER_FORMATS),
        cli="--for",
        required=True,
    )
    fmt: str | None = option(
        None,
        "The base's weight format: w4a16 for vllm; q4_0 or q8_0 for llama.cpp [default: w4a16 / q4_0].",
        choices=tuple(f for fs in SERVER_FORMATS.values() for f in fs),
        cli="--format",
    )
    adapter: str | None = option(
        None, "The adapter trained on RESIDUAL: written beside the base as the server takes it."
    )
    out: str | None = option(None, "Output directory.", short="-o", required=True)


@dataclass
class CheckOptions(Options):
    """`check`: the rules an adapter breaks for a server or PEFT."""

    target: str = option("vllm", "Where the adapter will be loaded.", choices=CHECK_TARGETS, cli="--for")
    max_lora_rank: int = option(16, "The vLLM server's --max-lora-rank.")
    base: str | None = option(
        None, "Base model directory (needed --for llama.cpp; --for peft: default base_model_name_or_path)."
    )


@dataclass
class ServeCheckOptions(Options):
    """`serve-check`: an export served by the real server, compared with the trained model."""

    server: str | None = option(
        None,
        "The server that runs DIR (also spelled --for, as for check and convert).",
        choices=SERVERS,
        cli="--server",
        short="--for",
        required=True,
    )
    prompts: str | None = option(
        None,
        "A file of prompts, one a line: a JSON list of token ids, or text (the "
        "model's tokenizer) [default: 4 fixed random prompts of 16 tokens].",
    )
    tolerance: float | None = option(
        None,
        "Largest |served − trained| log-probability accepted [default: 1e-3 "
        "vLLM float32, 0.15 vLLM W4A16; llama.cpp 2e-3 float, 0.05 Q8_0, 0.25 Q4_0].",
        low=0,
    )
    python: str | None = option(
        None,
        "The interpreter of the server's environment [default: $AILORA_VLLM_PYTHON / "
        "$AILORA_LLAMA_CPP_PYTHON, the environment `.ci/servers` builds, or this one].",
    )


@dataclass
class PushOptions(Options):
    """`push`: a directory to a Hub repo with a model card."""

    repo_id: str | None = option(None, "Hub repo, e.g. me/llama31-ailora.", required=True)
    private: bool = option(False, "Create the repo private.")
    revision: str | None = option(None, "Branch to upload to.")
    commit_message: str | None = option(None, "Commit message.")
    dry_run: bool = option(False, "List what would be uploaded, with sizes, and the model card; upload nothing.")


@dataclass
class SpectrumOptions(Writes):
    """`spectrum`: singular-value spectra of a model's target matrices."""

    out: str | None = option(
        None, "Output directory (spectrum.json, spectra.safetensors, PNG plots).", short="-o", required=True
    )
    targets: tuple[str, ...] = option(
        ("q_proj", "v_proj"),
        "Comma-separated module-name suffixes; aliases such as "
        "BERT's query/value are resolved; all-linear: every linear layer but the "
        "output head.",
    )
    rank: int = option(16, "r: energy in the top-r and bottom-r directions, σ at their edges.")
    adapter: str | None = option(None, "A trained adapter: adds ‖ΔW‖_F per layer.")
    initial: str | None = option(
        None, "Its initial adapter (default: the one its ailora-train.json names; none: ΔW = s·BA)."
    )
    plot_layers: int = option(4, "Layers shown in spectra.png (evenly spaced).")
    device: str = option("auto", "Where the eigenvalues are computed: auto, cpu, cuda, cuda:N.")
    revision: str | None = option(None, "Hub branch, tag or commit (Hub ids only).")
    allow_pickle: bool = option(False, "Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")


@dataclass
class VerifyOptions(Options):
    """`verify`: an output against its manifest."""

    no_reconstruction: bool = option(False, "Only check completeness and hashes.")


@dataclass
class DemoOptions(Options):
    """`demo`: the whole workflow on a built-in tiny model."""

    out: str = option("ailora-demo", "Directory for every step's output.", short="-o")
    steps: int = option(300, "Training steps.")


@dataclass
class CompareOptions(Writes):
    """`compare`: init methods side by side (its decompose and train settings are `InitOptions`, `TrainOptions`)."""

    out: str | None = option(
        None, "Output directory: one subdirectory per run, compare.md/json, plots.", short="-o", required=True
    )
    data: str | None = option(
        None, "Training data (as for train: JSONL, CSV, TSV, Parquet, a datasets directory).", required=True
    )
    methods: str | None = option(
        None,
        "Comma-separated init methods; also bitfit (train --bitfit, no decompose), "
        "dora (plain DoRA) and METHOD+dora [default: lora,pissa,milora,ailora, and lora-da "
        "when available and the task is causal-lm].",
    )
    progressive: int | None = option(
        None, "K: also run every method with progressive training (train --progressive K)."
    )
    target_loss: float | None = option(
        None, "Loss for 'steps to reach' [default: the highest final loss among the runs]."
    )
    smooth: int = option(10, "Training losses are a trailing mean over this many steps.")
    lr: str | None = option(
        None,
        "Learning rate(s): 2e-4; a sweep 1e-4,5e-4,2e-3 (every method runs each, the best "
        "on eval is its rate; all in compare.json); per method pissa=1e-4,lora=5e-4; auto: "
        "searched per method (see --lr-factor) [default: 2e-4].",
        metavar="RATES",
    )
    lr_factor: float = option(
        10**0.5,
        "--lr auto: factor between rates (√10, or 2 for a finer grid); the first grid "
        "is 3 rates around 1e-3 (adapters), 3.16e-4 (pissa, olora, corda), 1e-2 (bitfit), "
        "grown past the edge the best sits at.",
    )
    lr_max_rates: int = option(7, "--lr auto: most rates one method's search tries.")
    search_keep: int = option(2, "--lr auto: the best rates of the search (one seed) that run with every seed.")
    search_steps: int | None = option(None, "--lr auto: steps of a search run [default: those of the comparison].")
    lr_center: float | None = option(
        None, "--lr auto: the first grid's middle rate for every method [default: its family's, as in --lr-factor]."
    )
    baseline: str | None = option(None, "Method the others are compared with, paired by seed [default: lora].")
    interval: str = option(
        "t", "The 95% interval of a difference over seeds: Student's t or a bootstrap.", choices=("t", "bootstrap")
    )
    dry_run: bool = option(False, "Print the plan (runs, how many) and run nothing.")
    seeds: str | None = option(
        None,
        "Run every method with each seed (SVDs, init, data order); tables show mean ± std [default: --seed].",
        metavar="S,S,...",
    )
    metric: str = option(
        "auto",
        "Chooses each method's rate and the target of 'steps to reach': auto = accuracy for "
        "classification, pearson for regression (--num-labels 1), loss otherwise.",
        choices=METRICS,
    )
    target_metric: float | None = option(
        None, "Value of --metric for 'steps to reach' [default: the worst final value among the methods]."
    )
    revision: str | None = option(None, "Hub branch, tag or commit (Hub ids only).")
    resume: bool = option(
        False, "Finish an interrupted comparison: finished runs are kept, the interrupted one continues."
    )
