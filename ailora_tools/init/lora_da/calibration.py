"""LoRA-DA calibration statistics at bounded memory, one decoder or encoder layer at a time: `calibrate`.

Per target module W [out, in]: the K-FAC input factor Z = E[x xᵀ], the output factor E[g²] and the loss gradient G,
from calibration samples taken as `train` takes them, for a Llama, Mistral or Qwen2 causal LM or a BERT, RoBERTa or
XLM-RoBERTa masked LM or classifier. The model is never loaded: its parts are materialised from the shards one at a
time (`parts`, `decoder`, `encoder`), the samples run in micro-batches (`batches`) forward then backward layer by
layer (`runner`), layer inputs and gradients spill to files beyond a budget (`spill`), and hooks sum the statistics
(`statistics`). docs/lora-da-calibration.md gives the design: which tokens count, the memory bound `memory_bound`
computes, determinism, and where this differs from the authors' code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from ...architectures import CAUSAL_LM, CLASSIFY, MASKED_LM, task_of
from ...devices import resolve_device
from ...errors import OptionError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.examples import Example
from ...io.labels import LabeledExample
from ...io.tensorio import DTYPE_FLAGS, DTYPES
from .batches import build_batches
from .decoder import LAYER_MODULE, DecoderParts
from .encoder import EncoderParts
from .masks import require_transformers
from .runner import HEAD_CHUNK_BYTES, run_layers
from .statistics import CenteredHooks, CovarianceHooks, GradientHooks, ModuleStatistics, StatisticsHooks

#: model_type values whose decoder layers calibrate (causal LM), and whose encoder layers do (masked LM, classification)
DECODERS, ENCODERS = ("llama", "mistral", "qwen2"), ("bert", "roberta", "xlm-roberta")
SUPPORTED = DECODERS + ENCODERS
#: the tasks each kind calibrates for
TASKS = {CAUSAL_LM: DECODERS, MASKED_LM: ENCODERS, CLASSIFY: ENCODERS}
TOKEN_MASKS = ("attention", "labels")
FIXED_OVERHEAD = 64 << 20
#: what `calibrate` sums per module: LoRA-DA's statistics, the loss gradient alone (LoRA-GA), the input covariance
#: as PEFT's CorDA takes it (forward only), the inputs' centred scatter (EVA, forward only)
STATISTICS = {
    "lora-da": StatisticsHooks,
    "gradient": GradientHooks,
    "covariance": CovarianceHooks,
    "centered": CenteredHooks,
}


def calibrate(
    model: str | os.PathLike | Checkpoint,
    examples: Sequence[Example] | Sequence[LabeledExample],
    modules: Sequence[str],
    *,
    task: str = "auto",
    labels: dict | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 1,
    token_mask: str = "attention",
    activation_budget: int = 1 << 30,
    scratch: str | os.PathLike | None = None,
    progress: bool = True,
    statistics: str = "lora-da",
) -> Iterator[ModuleStatistics]:
    """Statistics of each target module (LoRA-DA's by default), yielded layer by layer once that layer is done: from
    the top, or from the bottom for the forward-only "covariance".

    Everything is checked before this returns; the work runs as the iterator is consumed. Drop each
    statistics object once used to keep memory bounded (docs/lora-da-calibration.md gives the bound).

    Args:
        model: a local model directory, a Hub id, or an opened `Checkpoint` (safetensors weights).
        examples: calibration samples: `Example`s (token ids and labels, -100 where no loss is taken) for the
            language-model tasks, `LabeledExample`s (label ids, or floats for regression) for classification.
        modules: full names of target linear modules inside decoder or encoder layers, as the checkpoint names
            them, e.g. "model.layers.3.self_attn.q_proj", "bert.encoder.layer.3.attention.self.query".
        task: "causal-lm" (decoders), "masked-lm" or "sequence-classification" (encoders); "auto": what the
            checkpoint was saved for (a bare encoder: masked-lm), as `train --task auto`.
        labels: for classification, the head's config keys (num_labels, id2label, label2id, problem_type) as
            `io.examples.label_ids` gives them (default: the checkpoint's own head).
        seed: torch's seed for a classification head the checkpoint lacks (train's --seed).
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        dtype: compute dtype, "float32", "bfloat16" or "float16"; default: the checkpoint's, but float32 for
            a float16 one (nothing here scales the loss against underflow). Statistics are float32 either way.
        batch_size: samples per micro-batch, right-padded to the longest; results do not depend on it
            beyond rounding.
        token_mask: "attention" (every token, the authors' default) or "labels" (loss positions only)
            for Z and the output factor.
        activation_budget: bytes of layer inputs and gradients kept in RAM; the rest goes to files.
        scratch: directory for those files (default: the system's temporary directory).
        progress: show a progress bar (one step per layer and pass).
        statistics: what to sum (`STATISTICS`): "lora-da" (Z, E[g²], G), "gradient" (G only: LoRA-GA), "covariance"
            (CorDA's input covariance in `input_factor`, forward only: the head is never loaded), "centered" (EVA:
            the float64 scatter Σ(x − μ)(x − μ)ᵀ of the inputs' real tokens in `input_factor`, forward only).

    Returns:
        An iterator of `ModuleStatistics`, one per module.

    Raises:
        UnsupportedError: a model_type other than llama, mistral, qwen2, bert, roberta, xlm-roberta, or a task
            its kind does not calibrate for; a bad dtype, token_mask, device; a transformers older than 5.4.
        OptionError: a batch_size below 1 or a negative activation_budget.
        TargetError: a module that is not a linear module inside a decoder or encoder layer.
        FormatError: no sample has a loss token; a token id outside the vocabulary; a label outside the head; a
            tensor missing or of the wrong shape in the checkpoint (a masked-LM task without the MLM head).

    Example:
        >>> stats = {s.name: s for s in calibrate("./llama", examples,
        ...                                       ["model.layers.0.self_attn.q_proj"])}  # doctest: +SKIP
    """
    require_transformers()
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    task = check_supported(ckpt, task)
    model_type = ckpt.config.get("model_type")
    if token_mask not in TOKEN_MASKS:
        raise UnsupportedError(f"token_mask {token_mask!r}: choose one of {', '.join(TOKEN_MASKS)}")
    if statistics not in STATISTICS:
        raise UnsupportedError(f"statistics {statistics!r}: choose one of {', '.join(STATISTICS)}")
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    if batch_size < 1 or activation_budget < 0:
        raise OptionError(
            f"{{batch_size}} {batch_size} / {{activation_budget}} {activation_budget}: "
            "need batch_size >= 1 and activation_budget >= 0"
        )
    dev = resolve_device(device)
    net = (DecoderParts if model_type in DECODERS else EncoderParts)(ckpt, task, dtype, dev, labels=labels, seed=seed)
    targets = net.targets(modules)
    batches, skipped = build_batches(examples, batch_size, token_mask, net, dev)
    return run_layers(net, targets, batches, skipped, activation_budget, scratch, progress, STATISTICS[statistics])


def check_supported(ckpt: Checkpoint, task: str) -> str:
    """The task `task` ("auto" or a task) means for `ckpt`, if its kind of model calibrates for it.

    Raises:
        UnsupportedError: another model_type (naming the supported ones), or a task its kind does not calibrate for.
    """
    model_type = ckpt.config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedError(
            f"{ckpt.source}: model_type {model_type!r} is not supported by LoRA-DA calibration; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    task = task_of(task, ckpt.config)
    if model_type not in TASKS.get(task, ()):
        kinds = [t for t, types in TASKS.items() if model_type in types]
        raise UnsupportedError(
            f"{ckpt.source}: LoRA-DA calibrates a {model_type} model for {' or '.join(kinds)}, not for --task {task}"
        )
    return task


def memory_bound(
    config: dict,
    modules: Sequence[str],
    *,
    batch_size: int,
    max_tokens: int,
    activation_budget: int,
    dtype: str | None = None,
) -> int:
    """docs/lora-da-calibration.md's bound on the peak memory of a CPU run, in bytes above the baseline.

    Args:
        config: the checkpoint's config.json as a dict (Llama, Mistral or Qwen2).
        modules: the target module names passed to `calibrate`.
        batch_size, max_tokens: the micro-batch size and the longest sample's length in tokens.
        activation_budget: as passed to `calibrate`.
        dtype: the compute dtype passed to `calibrate` (default: the stored one).

    Example:
        >>> cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...        "vocab_size": 128, "torch_dtype": "float32"}
        >>> memory_bound(cfg, ["model.layers.0.self_attn.q_proj"], batch_size=1, max_tokens=16,
        ...              activation_budget=0) // 2**20
        64
    """
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    compute = dtype or ("bfloat16" if stored == "bfloat16" else "float32")  # as `calibrate` chooses
    b = max(DTYPES[DTYPE_FLAGS.get(name, "F32")][1] for name in (stored, compute))
    H, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or H // heads
    kv = config.get("num_key_value_heads") or heads
    shapes = {
        "q_proj": (heads * hd, H),
        "k_proj": (kv * hd, H),
        "v_proj": (kv * hd, H),
        "o_proj": (H, heads * hd),
        "gate_proj": (F, H),
        "up_proj": (F, H),
        "down_proj": (H, F),
    }
    layer = sum(o * i + o for o, i in shapes.values()) + 2 * H  # weights, biases (Qwen2's q/k/v), two norms
    per_layer: dict[str, list[tuple[int, int]]] = {}
    for m in modules:
        found = LAYER_MODULE.match(m)
        per_layer.setdefault(found.group(1) if found else "", []).append(shapes[m.rsplit(".", 1)[-1]])
    stats = max(
        (sum(o * i + o for o, i in s) + sum(i * i for i in {i for _, i in s}) for s in per_layer.values()), default=0
    )  # (one Z per distinct input width: its upper bound)
    tokens = batch_size * max_tokens
    work = tokens * (32 * H + 12 * F) * 4 + 3 * batch_size * heads * max_tokens**2 * 4
    head = 3 * min(tokens * V * 4, HEAD_CHUNK_BYTES)
    return FIXED_OVERHEAD + 2 * max(layer, V * H) * b + activation_budget + 4 * stats + work + head
