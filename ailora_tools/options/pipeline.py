"""Every setting of decompose and train (and the init settings compare and get_ailora_model share)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..architectures import CAUSAL_LM, CLASSIFY, MASKED_LM
from ..errors import OptionError
from ..io.examples import Columns
from .commands import DTYPES
from .fields import Options, option

SVD_MODES = ("exact", "randomized")
SCHEDULERS = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ADAPTER_BASES = ("auto", "residual", "original")
QUANTIZE = ("nf4",)
TASKS = ("auto", CAUSAL_LM, MASKED_LM, CLASSIFY)


@dataclass
class TaskOptions(Options):
    """What the data is for and where its columns are: `train`'s objective, and LoRA-DA's calibration loss in
    `decompose` (the same loss, so that calibration sees what training will)."""

    task: str = option(
        "auto",
        "What to train for (and, for lora-da, calibrate on); auto: what the base was saved for (its "
        "config's architectures; a bare encoder: masked-lm).",
        choices=TASKS,
    )
    num_labels: int | None = option(
        None,
        "Classes of a new classification head (default: from the labels); 1: "
        "regression (STS-B), float labels, Pearson/Spearman.",
        low=1,
    )
    text_column: str | None = option(
        None, 'Column (key) of the text [default: "text", or "text_a" for pairs].', metavar="NAME"
    )
    text_pair_column: str | None = option(
        None, 'Column of the second text of a sentence pair [default: "text_b" with "text_a"].', metavar="NAME"
    )
    label_column: str | None = option(None, 'Column of the label [default: "label"].', metavar="NAME")

    @property
    def columns(self):
        """The data columns (`io.examples.Columns`) these options name."""
        return Columns(self.text_column, self.text_pair_column, self.label_column)


@dataclass
class InitOptions(Options):
    """How the initial adapter is computed from each target matrix: decompose, get_ailora_model and compare."""

    method: str = option("ailora", "Init method.")
    rank: int = option(16, "LoRA rank r.", low=1)
    alpha: float | None = option(None, "LoRA alpha (default: rank, so s = 1).", above=0)
    rslora: bool = option(False, "Scale by alpha/sqrt(r) instead of alpha/r.")
    targets: tuple[str, ...] = option(
        ("q_proj", "v_proj"),
        "Comma-separated module-name suffixes; aliases such as "
        "BERT's query/value are resolved; all-linear: every linear layer but the output "
        "head (PEFT's). A fused matrix is targeted whole (qkv_proj, c_attn, "
        "query_key_value, Wqkv): q_proj on it is refused.",
    )
    roles: dict[str, str] = option(
        {},
        "NAME=principal|minor, repeatable; overrides the method's roles. ailora's "
        "defaults: Q and K principal, V and the attention output minor (the QK and OV "
        "circuits), every other module principal (PiSSA's); a fused QKV matrix: Q rows "
        "principal, V rows minor, in one pair (docs/fused-projections.md).",
        cli="--role",
    )
    svd: str = option(
        "randomized",
        "Principal components: exact (converged to 1e-5·σ_max) or seeded randomized. Minor ones are always exact.",
        choices=SVD_MODES,
    )
    niter: int = option(4, "Randomized SVD power iterations.", low=0)
    oversample: int = option(8, "Randomized SVD oversampling (extra directions; also the exact method's block).", low=0)
    seed: int = option(0, "Seed for the randomized SVDs and the Kaiming init.")
    device: str = option("auto", "Where the SVDs run: auto, cpu, cuda, cuda:N.")
    dora: bool = option(
        False,
        "DoRA (PEFT's use_dora): the adapter also holds a magnitude per output feature, set to "
        "the row norms of the base + s·B0·A0 so that step 0 reproduces the model.",
    )
    no_offset: bool = option(
        False,
        "Leave the base as it is (the LoRA-DA authors' setting): s·B0·A0 is not subtracted, "
        "so step 0 is base + s·B0·A0, not the base; the adapter applies to the original model "
        "like plain LoRA, and no residual is written. Same factors as without it.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.targets, str):  # "q_proj,k_proj" means two targets, not eight letters
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        self.roles = dict(self.roles or {})

    @property
    def lora_alpha(self) -> float:
        """alpha, or the rank when not given."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class DecomposeOptions(InitOptions, TaskOptions):
    """Everything `decompose` computes and writes besides where from and where to."""

    residual_dtype: str | None = option(
        None, "dtype of residual target weights (default: the checkpoint's).", choices=DTYPES
    )
    revision: str | None = option(None, "Hub branch, tag or commit (Hub ids only).")
    no_residual: bool = option(
        False,
        "Write only the adapter, no residual: train then runs on the ORIGINAL model "
        "with s·B0·A0 subtracted inside the adapter, so convert serves exactly what was "
        "trained (best for 16-bit checkpoints); takes seconds on any model size.",
    )
    data: str | None = option(
        None,
        "Calibration data for data-aware methods (lora-da, corda, lora-ga, eva), in "
        "train's --data format for --task (decoders: causal-lm; encoders: masked-lm rows, or "
        "labeled rows with --task sequence-classification and the column options).",
        metavar="PATH",
    )
    samples: int = option(64, "Calibration samples: the first N rows of --data.", low=1)
    max_length: int = option(512, "Longest calibration sample, in tokens (longer ones are refused).", low=2)
    corda_mode: str = option(
        "ipm",
        "corda: keep the r largest directions of W·C (ipm, instruction-previewed) or the "
        "r smallest (kpm, knowledge-preserved).",
        choices=("ipm", "kpm"),
    )
    ga_direction: str = option(
        "ArB2r",
        "lora-ga: how the 2r gradient directions are shared out between A0 and B0 (PEFT's LoraGAConfig.direction).",
        choices=("ArB2r", "A2rBr", "ArBr", "random"),
    )
    ga_scale: str = option(
        "stable",
        "lora-ga: how B0 (or both) is scaled (PEFT's LoraGAConfig.scale).",
        choices=("stable", "weight_svd", "gd_scale", "unit"),
    )
    ga_gamma: float = option(16.0, "lora-ga: γ of the stable scale.", above=0)
    eva_rho: float = option(
        2.0,
        "eva: each target's rank at most round(r·ρ), the total r × targets redistributed "
        "by explained variance (PEFT's EvaConfig.rho); 1 keeps r everywhere.",
        low=1,
    )
    allow_pickle: bool = option(False, "Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")
    quantize: str | None = option(
        None,
        "Write the residual targets pre-quantised (bitsandbytes NF4, double "
        "quantisation; transformers loads it as it is): QLoRA on the residual (QPiSSA for "
        "pissa; plain QLoRA for lora). Needs bitsandbytes (the `quant` extra).",
        choices=QUANTIZE,
    )
    quantize_all: bool = option(
        False, "With --quantize: every linear weight, not only the targets (the model heads stay float)."
    )
    loftq_iters: int = option(
        0,
        "With --quantize: LoftQ alternations (W_res = W − s·B·A, Q = quant(W_res), B and A "
        "refitted from the principal SVD of W − dequant(Q)), for principal-role targets and "
        "plain LoRA; minor-role and lora-da targets keep their factors and are quantised once.",
        low=0,
        metavar="T",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, given in (("quantize_all", self.quantize_all), ("loftq_iters", self.loftq_iters)):
            if given and self.quantize is None:
                raise OptionError(f"{{{name}}}: applies to a quantised residual; add {{quantize}} nf4")
        clash = next(
            (
                f
                for f, on in (("no_residual", self.no_residual), ("no_offset", self.no_offset), ("dora", self.dora))
                if on
            ),
            None,
        )
        if self.quantize is not None and clash:
            why = " (the quantised model is the residual)" if clash != "dora" else " (not supported yet)"
            raise OptionError(f"{{quantize}} {self.quantize}: not with {{{clash}}}{why}; drop one of the two")
        for given, other in (("no_residual", self.no_residual), ("no_offset", self.no_offset)):
            if other and self.residual_dtype is not None:
                raise OptionError(f"{{residual_dtype}}: {{{given}}} writes no residual; drop one of the two")
        if self.no_offset and self.no_residual:
            raise OptionError(
                "{no_offset} and {no_residual}: {no_residual} trains on the original with s·B0·A0 "
                "subtracted (step 0 = the model), {no_offset} without (step 0 = model + s·B0·A0); "
                "choose one"
            )
        if self.dora and self.no_residual and self.method != "lora":
            raise OptionError(
                f"{{dora}}: not with {{no_residual}} for {{method}} {self.method}: DoRA's norm is that "
                "of the base the adapter applies to, and PEFT would not subtract s·B0·A0 from it; drop "
                "{no_residual}"
            )
        if self.data is not None:
            self.data = os.fspath(self.data)


@dataclass
class TrainOptions(TaskOptions):
    """How `train` runs, besides the base, the adapter, the data and the output."""

    eval_data: str | None = option(
        None,
        "Evaluation data, in --data's format (eval loss, and the classification "
        "metrics, at the start, every --eval-every steps and at the end).",
        metavar="PATH",
    )
    epochs: int = option(1, "Passes over the data (ignored when --max-steps is given).", low=1)
    max_steps: int | None = option(None, "Optimizer steps to run.", low=1)
    lr: float = option(2e-4, "Peak learning rate (AdamW).", above=0)
    batch_size: int = option(
        4, "Examples per micro-batch, all ranks together (under torchrun each rank takes its slice of them).", low=1
    )
    grad_accum: int = option(1, "Micro-batches per optimizer step.", low=1)
    max_length: int = option(512, "Tokens per example (longer ones are cut).", low=2)
    warmup: int = option(0, "Warm-up steps.", low=0)
    warmup_ratio: float | None = option(
        None, "Warm-up as a fraction of the steps (0.06 in the LoRA paper's GLUE recipe); instead of --warmup.", low=0
    )
    weight_decay: float = option(0.0, "AdamW weight decay (0.1 in LoRA's GLUE scripts).", low=0)
    scheduler: str = option("cosine", "Learning-rate schedule after warm-up.", choices=SCHEDULERS)
    seed: int = option(0, "Seed for data order and model-side randomness.")
    save_every: int | None = option(None, "Checkpoint every N steps (one is always saved at the end).", low=1)
    eval_every: int | None = option(None, "Evaluate every N steps.", low=1)
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    dtype: str = option("auto", "auto: bfloat16 autocast on CUDA, float32 on CPU.", choices=COMPUTE_DTYPES)
    tokenizer: str | None = option(
        None,
        "Tokenizer directory or Hub id, for a base without tokenizer files (default: the base's).",
        metavar="DIR_OR_HUB_ID",
    )
    progressive: int | None = option(
        None,
        "Progtuning: K stages of equal steps (one per epoch with --epochs K); "
        "stage k updates only the blocks from part k up (lower blocks freeze first), "
        "and the backward pass stops there.",
        low=1,
        metavar="K",
    )
    adapter_base: str = option(
        "auto",
        "auto: as decompose's manifest records. residual: train base + s·B·A. "
        "original: train base + s(B·A − B0·A0) on the original model (exact).",
        choices=ADAPTER_BASES,
    )
    gradient_checkpointing: bool = option(
        False,
        "Recompute each block's activations in the backward pass instead "
        "of keeping them (less memory for long sequences, about a third more "
        "compute; the same gradients).",
    )
    fsdp: bool = option(
        False,
        "Under torchrun: shard the model across the ranks (torch's FSDP2, one unit per "
        "transformer block), each device holding 1/N of the weights, for a base that does not fit "
        "on one device.",
    )
    bitfit: bool = option(
        False,
        "BitFit: train only the bias terms of --base (and a classification head), no "
        "--adapter; `merge BASE OUT` writes them into the model.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_data is not None:
            self.eval_data = os.fspath(self.eval_data)
        if self.tokenizer is not None:
            self.tokenizer = os.fspath(self.tokenizer)
        if self.warmup_ratio is not None and self.warmup_ratio > 1:
            raise OptionError(f"{{warmup_ratio}} {self.warmup_ratio}: a fraction of the steps, at most 1")
        if self.warmup_ratio is not None and self.warmup:
            raise OptionError(f"{{warmup_ratio}} {self.warmup_ratio} and {{warmup}} {self.warmup}: give one of the two")

    def warmup_steps(self, total: int) -> int:
        """warmup, or warmup_ratio of `total` steps (rounded up, as transformers' Trainer does)."""
        return math.ceil(self.warmup_ratio * total) if self.warmup_ratio is not None else self.warmup
