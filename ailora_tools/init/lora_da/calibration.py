"""LoRA-DA calibration statistics at bounded memory, one decoder or encoder layer at a time.

For each target linear module W [out, in] of a Llama, Mistral or Qwen2 checkpoint (causal LM), or of a BERT,
RoBERTa or XLM-RoBERTa one (masked LM or sequence classification), and calibration samples (`io.examples.Example`:
token ids, labels -100 where no loss is taken; for classification `LabeledExample`: token ids, token types and
one label), `calibrate` yields:

- Z = E[x xᵀ], the second moment of the module's input over tokens (the K-FAC input factor). Modules
  that read the same tensor (q/k/v, gate/up) share one Z, computed once;
- the output factor E[g²], the diagonal second moment of g = ∂L_n/∂y, the gradient of sample n's loss
  with respect to the module's output y, over the same tokens;
- G = ∂L/∂W = (1/N) Σ_n ∂L_n/∂W, where L_n is sample n's loss as `train` takes it at batch size 1, as in
  the authors' code: causal LM, the mean cross-entropy over its loss tokens (positions whose next label is not
  -100); masked LM, the mean cross-entropy over its masked tokens (labels not -100, at their own position);
  sequence classification, the cross-entropy of its label (a regression head, one output: the squared error)
  through the classification head, which reads the first token.

Encoders, and the head of a classifier. The authors' code calibrates decoders (and T5) on their text-to-text
loss only; for an encoder we take the loss `train` will take, through the head `train` will start from: the
checkpoint's own, or, where the checkpoint has none (a bare BertModel, a masked-LM checkpoint), a new head
drawn as transformers draws it when `train` loads the model, from the same seed (`seed`: train's --seed; the
same draw, bit for bit, when decompose and train get the same seed, as compare gives them). A new head's
gradient at its initialisation is what the first training steps see, so the data-aware directions are the
ones training will follow from there. The masked-LM head must be in the checkpoint, as `train` requires.

Which tokens Z and E[g²] average over is the authors' `fisher_token_mask`: "attention" (their default)
takes every token of every sample, prompt included; "labels" only the positions whose outputs enter the
loss (for a classifier: the first token). Both are token-weighted means over all samples, as theirs. G sums over every token: prompt tokens
get gradient too, through attention. Samples without a loss token are left out (and counted).

How. The model is never loaded: transformers builds the checkpoint's model class from its config on the
meta device, and each part (embeddings, one decoder or encoder layer, the head: final norm + lm_head, the
MLM head, or pooler + classifier) is materialised with `to_empty` and filled from the shards (`Checkpoint` +
`read_tensor`, whatever base model prefix the tensors carry; a tied decoder from the word embeddings) only
while it runs. Forward: embeddings (token types and positions as the model computes them), then layer by
layer over all samples without autograd, keeping each layer's input; the head, applied at loss positions
only and in chunks, gives the loss and its gradient with respect to the last hidden states. Backward: from the top layer down to the lowest layer that has a target,
each layer is recomputed from its saved input with autograd; hooks on the target modules take x and g,
and the gradient with respect to the layer's input is passed down. Attention, rotary embeddings and
masks (causal, sliding-window, or an encoder's bidirectional padding mask) are transformers' own. The checkpoint is read twice. Layer inputs and gradients stay in RAM up to
`activation_budget` bytes, beyond that in files in a temporary directory, removed at the end; the disk
needs up to (layers − lowest target layer + 2) × samples × longest sample × hidden × b bytes.

Peak memory above the process's after importing this module (CPU; `memory_bound` computes it for decoders;
an encoder's layer and head take less than the bound's terms for the same sizes):

    64 MiB                                   fixed: meta model, transformers' modelling code, allocator
  + 2 · max(one decoder layer, V·H) · b      the weights in use, and the read buffer of one tensor
  + activation_budget                        layer inputs and gradients kept in RAM
  + one layer's statistics · 4               G and E[g²] per target, Z per distinct input, float32
  + B·T·(32·H + 12·I)·4 + 3·B·heads·T²·4     one micro-batch through one layer with autograd
  + 3 · min(B·T·V·4, 32 MiB)                 the head's logits and their gradient, in chunks

where b is the larger byte size of the compute and stored dtypes, B the batch size, T the longest
sample, H the hidden size, I the intermediate size, V the vocabulary and heads the number of attention
heads. Statistics the caller keeps come on top (G alone is as large as the targets in float32), and so
does the caller's own data. On CUDA the weights and the micro-batch live on the GPU; activations, spill
files and statistics on the host. (glibc keeps freed heap memory, so the heap is trimmed after each
layer; without that, RSS grew by about one layer's weights per layer of the backward pass.)

Determinism: the same inputs give bit-identical statistics on the CPU (tested); micro-batches are
processed in order and nothing is drawn at random. On CUDA, only as deterministic as the attention
kernels' backward.

Where this differs from the authors' code (`lora_da.py`, `run_exp.py` of zqy0126/LoRA-DA): one set of
samples gives both G and the factors (theirs draws 256 of each, by default the same ones); the passes
run in eval mode (no dropout; their models have none); G is summed in float32 from x and g (theirs is
the model-dtype `.grad`); all layers are done in one pass (their `fisher_layers_per_pass` re-runs the
whole model per group of layers, to bound the memory of their hooks); attention is transformers'
default (SDPA; theirs flash-attention 2). Their "sequence_lowrank" output factor is not implemented.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoConfig

try:  # transformers.masking_utils exists since 4.53; the call below needs 5.4 (see `require_transformers`)
    from transformers.masking_utils import (
        create_bidirectional_mask,
        create_causal_mask,
        create_sliding_window_causal_mask,
    )
except ImportError:
    create_causal_mask = create_sliding_window_causal_mask = create_bidirectional_mask = None

from ...architectures import CAUSAL_LM, CLASSIFY, MASKED_LM, auto_class, task_of
from ...devices import resolve_device
from ...errors import FormatError, OptionError, TargetError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.examples import IGNORE, Example, LabeledExample
from ...io.tensorio import DTYPE_FLAGS, DTYPES, read_tensor, torch_dtype

#: model_type values whose decoder layers calibrate (causal LM), and whose encoder layers do (masked LM, classification)
DECODERS, ENCODERS = ("llama", "mistral", "qwen2"), ("bert", "roberta", "xlm-roberta")
SUPPORTED = DECODERS + ENCODERS
#: the tasks each kind calibrates for
TASKS = {CAUSAL_LM: DECODERS, MASKED_LM: ENCODERS, CLASSIFY: ENCODERS}
TOKEN_MASKS = ("attention", "labels")
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: an encoder's layer modules, with or without the base model prefix (bert., roberta.)
ENCODER_MODULE = re.compile(r"^((?:\w+\.)?encoder\.layer\.)(\d+)\.(.+)$")
FIXED_OVERHEAD = 64 << 20
try:  # glibc's malloc_trim, to give freed heap memory back after each layer
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None
HEAD_CHUNK_BYTES = 32 << 20  # float32 logits per lm_head chunk
#: the first transformers release whose mask functions take `inputs_embeds=` without a `cache_position`
TRANSFORMERS_NEEDED = "5.4"


@dataclass
class ModuleStatistics:
    """LoRA-DA statistics of one target linear module W [out, in]; tensors float32 on the CPU."""

    name: str
    #: modules with the same key read the same input and share `input_factor` (the same tensor object)
    input_key: str
    input_factor: torch.Tensor  # Z = E[x xᵀ], [in, in]
    output_factor: torch.Tensor  # E[g²], [out]
    gradient: torch.Tensor  # G = ∂L/∂W averaged over samples, [out, in]
    tokens: int  # tokens Z and the output factor average over
    samples: int  # samples G averages over
    skipped: int  # samples left out for having no loss token
    loss: float  # mean calibration loss over the samples


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
) -> Iterator[ModuleStatistics]:
    """LoRA-DA statistics of each target module, yielded layer by layer from the top once that layer is done.

    Everything is checked before this returns; the work runs as the iterator is consumed. Drop each
    statistics object once used to keep memory bounded (see the module docstring for the bound).

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
        >>> stats = {s.name: s for s in calibrate("./llama", examples, ["model.layers.0.self_attn.q_proj"])}  # doctest: +SKIP
    """
    require_transformers()
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    task = check_supported(ckpt, task)
    model_type = ckpt.config.get("model_type")
    if token_mask not in TOKEN_MASKS:
        raise UnsupportedError(f"token_mask {token_mask!r}: choose one of {', '.join(TOKEN_MASKS)}")
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    if batch_size < 1 or activation_budget < 0:
        raise OptionError(f"{{batch_size}} {batch_size} / {{activation_budget}} {activation_budget}: "
                               "need batch_size >= 1 and activation_budget >= 0")
    dev = resolve_device(device)
    net = (_Decoder if model_type in DECODERS else _Encoder)(ckpt, task, dtype, dev, labels=labels, seed=seed)
    targets = net.targets(modules)
    batches, skipped = _batches(examples, batch_size, token_mask, net, dev)
    return _run(net, targets, batches, skipped, activation_budget, scratch, progress)


def check_supported(ckpt: Checkpoint, task: str) -> str:
    """The task `task` ("auto" or a task) means for `ckpt`, if its kind of model calibrates for it.

    Raises:
        UnsupportedError: another model_type (naming the supported ones), or a task its kind does not calibrate for.
    """
    model_type = ckpt.config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedError(f"{ckpt.source}: model_type {model_type!r} is not supported by LoRA-DA calibration; "
                               f"supported: {', '.join(SUPPORTED)}")
    task = task_of(task, ckpt.config)
    if model_type not in TASKS.get(task, ()):
        kinds = [t for t, types in TASKS.items() if model_type in types]
        raise UnsupportedError(f"{ckpt.source}: LoRA-DA calibrates a {model_type} model for {' or '.join(kinds)}, "
                               f"not for --task {task}")
    return task


def require_transformers() -> None:
    """Check that transformers' mask functions take what `_Decoder.layer_kwargs` passes: `inputs_embeds=` and no
    `cache_position` (required before 5.4; transformers.masking_utils itself is new in 4.53).

    Raises:
        UnsupportedError: an older transformers, naming the installed and the required version.
    """
    if create_causal_mask is None or not all(map(_takes_our_call, (create_causal_mask,
                                                                   create_sliding_window_causal_mask))):
        raise UnsupportedError(f"LoRA-DA calibration needs transformers >= {TRANSFORMERS_NEEDED} (its masking API); "
                               f"transformers {transformers.__version__} is installed: run `pip install -U "
                               f"'transformers>={TRANSFORMERS_NEEDED}'`, or use another --method")


def _takes_our_call(mask_function) -> bool:
    params = inspect.signature(mask_function).parameters
    cache = params.get("cache_position")
    return "inputs_embeds" in params and (cache is None or cache.default is not inspect.Parameter.empty)


def memory_bound(config: dict, modules: Sequence[str], *, batch_size: int, max_tokens: int,
                 activation_budget: int, dtype: str | None = None) -> int:
    """The module docstring's bound on the peak memory of a CPU run, in bytes above the baseline.

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
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or H // heads
    kv = config.get("num_key_value_heads") or heads
    shapes = {"q_proj": (heads * hd, H), "k_proj": (kv * hd, H), "v_proj": (kv * hd, H), "o_proj": (H, heads * hd),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    layer = sum(o * i + o for o, i in shapes.values()) + 2 * H  # weights, biases (Qwen2's q/k/v), two norms
    per_layer: dict[str, list[tuple[int, int]]] = {}
    for m in modules:
        found = LAYER_MODULE.match(m)
        per_layer.setdefault(found.group(1) if found else "", []).append(shapes[m.rsplit(".", 1)[-1]])
    stats = max((sum(o * i + o for o, i in s) + sum(i * i for i in {i for _, i in s}) for s in per_layer.values()),
                default=0)  # (one Z per distinct input width: its upper bound)
    tokens = batch_size * max_tokens
    work = tokens * (32 * H + 12 * I) * 4 + 3 * batch_size * heads * max_tokens**2 * 4
    head = 3 * min(tokens * V * 4, HEAD_CHUNK_BYTES)
    return FIXED_OVERHEAD + 2 * max(layer, V * H) * b + activation_budget + 4 * stats + work + head


def _compute_dtype(stored: str | None, dtype: str | None) -> torch.dtype:
    """The compute dtype: `dtype`, or bfloat16 for a bfloat16 checkpoint (`stored`: its embeddings' dtype), else
    float32."""
    if dtype is not None:
        return torch_dtype(DTYPE_FLAGS[dtype])
    return torch.bfloat16 if stored == "BF16" else torch.float32


@dataclass
class _Batch:
    """One right-padded micro-batch on the compute device."""

    ids: torch.Tensor  # [B, T] long
    attention: torch.Tensor  # [B, T] long, 1 on real tokens
    positions: torch.Tensor  # [B, T] long
    types: torch.Tensor  # [B, T] long: token types (encoders; zeros without a pair)
    real: torch.Tensor  # [B, T] bool: tokens G sums over
    factor: torch.Tensor  # [B, T] bool: tokens Z and E[g²] average over
    rows: torch.Tensor  # [K] sample index of each loss position
    cols: torch.Tensor  # [K] position whose output enters the loss
    labels: torch.Tensor  # [K] the target there: the next token, the masked token, the class id (float: regression)
    weights: torch.Tensor  # [K] float32, 1 / (loss positions of that sample)


def _batches(examples: Sequence[Example] | Sequence[LabeledExample], size: int, token_mask: str, net: _Parts,
             dev: torch.device) -> tuple[list[_Batch], int]:
    vocab, task = net.config.vocab_size, net.task
    kept = []
    for n, e in enumerate(examples):
        labeled = isinstance(e, LabeledExample)
        if labeled != (task == CLASSIFY):
            raise FormatError(f"calibration sample {n}: {'labeled rows are' if labeled else 'token labels are'} not "
                              f"what --task {task} calibrates on; give {'labeled' if task == CLASSIFY else 'text'} rows")
        if not e.input_ids or not labeled and len(e.input_ids) != len(e.labels):
            raise FormatError(f"calibration sample {n}: {len(e.input_ids)} token ids but "
                              f"{1 if labeled else len(e.labels)} labels; they must match and not be empty")
        bad = next((t for t in e.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise FormatError(f"calibration sample {n}: token id {bad} is outside the model's vocabulary of {vocab}; "
                              "tokenize with the model's own tokenizer")
        if labeled:
            net.check_label(n, e.label)
            kept.append(e)
        elif any(label != IGNORE for label in e.labels[task == CAUSAL_LM:]):  # causal: the first is never predicted
            kept.append(e)
    if not kept:
        where = "after the first position" if task == CAUSAL_LM else "at a masked position"
        raise FormatError(f"calibration data: none of the {len(examples)} samples has a loss token (a label other "
                          f"than -100 {where}); give samples with {'completion' if task == CAUSAL_LM else 'masked'} "
                          "tokens")
    out = []
    for start in range(0, len(kept), size):
        group = kept[start:start + size]
        T = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), T), net.pad_id, dtype=torch.long)
        types = torch.zeros(len(group), T, dtype=torch.long)
        attention = torch.zeros(len(group), T, dtype=torch.long)
        loss = torch.zeros(len(group), T, dtype=torch.bool)
        labels = torch.full((len(group), T), IGNORE, dtype=torch.long)
        for i, e in enumerate(group):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[i, :len(e.input_ids)] = 1
            if task == CLASSIFY:
                if e.token_type_ids is not None:
                    types[i, :len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
            else:
                labels[i, :len(e.labels)] = torch.tensor(e.labels)
        if task == CLASSIFY:  # the head reads the first token
            loss[:, 0] = True
        elif task == CAUSAL_LM:
            loss[:, :-1] = labels[:, 1:] != IGNORE
        else:
            loss = labels != IGNORE
        rows, cols = loss.nonzero(as_tuple=True)
        if task == CLASSIFY:
            targets = torch.tensor([e.label for e in group])[rows]
        else:
            targets = labels[rows, cols + (task == CAUSAL_LM)]
        weights = (1.0 / loss.sum(1).to(torch.float32))[rows]
        out.append(_Batch(ids.to(dev), attention.to(dev), torch.arange(T).expand(len(group), T).to(dev), types.to(dev),
                          attention.bool().to(dev), (attention.bool() if token_mask == "attention" else loss).to(dev),
                          rows.to(dev), cols.to(dev), targets.to(dev), weights.to(dev)))
    return out, len(examples) - len(kept)


class _Parts:
    """The checkpoint's model class on the meta device; parts are materialised from the shards one at a time.

    A subclass (one per kind of model) says what the parts are: `embeddings`, `layers`, `head_parts`, and how they
    run: `embed`, `layer_kwargs`, `head`."""

    #: buffers a part may hold, and how the model's constructor fills them (config -> tensor)
    BUFFERS: dict = {}

    def __init__(self, ckpt: Checkpoint, task: str, auto: str, dtype: str | None, dev: torch.device,
                 overrides: dict | None = None):
        import transformers

        self.ckpt, self.task, self.device = ckpt, task, dev
        config = AutoConfig.for_model(**{**ckpt.config, **(overrides or {})})
        with torch.device("meta"):
            self.model = getattr(transformers, auto).from_config(config).requires_grad_(False).eval()
        self.config = self.model.config
        self.prefix = self.model.base_model_prefix
        self.core = getattr(self.model, self.prefix)
        self.where = {name: shard for shard, header in ckpt.headers.items() for name in header.tensors}
        self.fds: dict[str, int] = {}
        self.dtype = _compute_dtype(self.stored_dtype(), dtype)
        self.model.to(self.dtype)
        self.pad_id = 0

    def stored_dtype(self) -> str | None:
        """The dtype the checkpoint stores the word embeddings in."""
        name = self.tensor_name(self.prefix + "." + _embedding_name(self.core))
        return self.ckpt.tensors[name].dtype if name is not None else None

    def tensor_name(self, full: str) -> str | None:
        """The checkpoint's name of the model's parameter `full` (with or without the base model prefix; a tied
        weight by the one it is tied to), None when the checkpoint lacks it."""
        bare = full.removeprefix(self.prefix + ".")
        for name in (full, bare, f"{self.prefix}.{bare}"):
            if name in self.where:
                return name
        tied = (getattr(self.model, "_tied_weights_keys", None) or {}) if self.config.tie_word_embeddings else {}
        return self.tensor_name(tied[full]) if isinstance(tied, dict) and full in tied else None

    def load(self, module: torch.nn.Module, init: torch.Generator | None = None) -> torch.nn.Module:
        """Materialise `module` on the device and fill it from the shards (each parameter by its name in the model,
        `tensor_name`). A parameter the checkpoint lacks is an error unless `init` is given:
        then the modules holding them are drawn by the model's own initialisation (as from_pretrained does)."""
        where = next(n for n, m in self.model.named_modules() if m is module)
        for local, buf in module.named_buffers():
            if local.rsplit(".", 1)[-1] not in self.BUFFERS:  # to_empty would leave them uninitialised
                raise UnsupportedError(f"{self.ckpt.source}: {local} is a buffer this transformers version's "
                                       "layers did not hold; LoRA-DA calibration cannot fill it")
        module.to_empty(device=self.device)
        missing: set[str] = set()
        with torch.no_grad():
            for local, buf in module.named_buffers():
                buf.copy_(self.BUFFERS[local.rsplit(".", 1)[-1]](self.config, buf.shape))
            for local, param in module.named_parameters():
                model_name = f"{where}.{local}".lstrip(".")
                name = self.tensor_name(model_name)
                if name is None:
                    if init is None:
                        raise FormatError(f"{self.ckpt.source}: tensor {model_name!r} is missing; the shards do not "
                                          "match config.json" + self.missing_hint())
                    missing.add(local)
                    continue
                shard = self.where[name]
                header = self.ckpt.headers[shard]
                if shard not in self.fds:
                    self.fds[shard] = os.open(header.path, os.O_RDONLY)
                tensor = read_tensor(header, name, self.fds[shard])
                if tuple(tensor.shape) != tuple(param.shape):
                    raise FormatError(f"{header.path}: tensor {name!r} has shape {list(tensor.shape)}, but the config "
                                      f"implies {list(param.shape)}")
                param.copy_(tensor)
                del tensor
            if missing:
                _initialise(self.model, module, missing, init)
        return module

    def missing_hint(self) -> str:
        return ""

    @staticmethod
    def unload(module: torch.nn.Module) -> None:
        module.to_empty(device="meta")
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def targets(self, modules: Sequence[str]) -> dict[int, dict[str, str]]:
        """layer index -> {name inside the layer: full module name}."""
        out: dict[int, dict[str, str]] = {}
        for name in modules:
            found = self.PATTERN.match(name)
            index, local = (int(found.group(found.re.groups - 1)), found.group(found.re.groups)) if found else (-1, "")
            ok = 0 <= index < len(self.layers)
            if ok:
                try:
                    ok = isinstance(self.layers[index].get_submodule(local), torch.nn.Linear)
                except AttributeError:
                    ok = False
            if not ok:
                raise TargetError(f"{name}: not a linear module inside {self.KIND} layer of {self.ckpt.source}; "
                                  f"LoRA-DA calibrates modules named {self.EXAMPLE}")
            out.setdefault(index, {})[local] = name
        if not out:
            raise TargetError(f"{self.ckpt.source}: no target modules given for LoRA-DA calibration")
        return out

    def check_label(self, n: int, label) -> None:
        """A classification label the head can take (encoders only)."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per loss position: cross-entropy of its label."""
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _embedding_name(core: torch.nn.Module) -> str:
    """The word embeddings' parameter name inside the base model."""
    emb = core.get_input_embeddings()
    return next(n for n, m in core.named_modules() if m is emb) + ".weight"


def _initialise(model, module: torch.nn.Module, missing: set[str], generator: torch.Generator) -> None:
    """Draw the parameters `missing` of `module` (materialised) as from_pretrained draws a checkpoint's missing
    weights: the model's `_init_weights` on each submodule holding only missing parameters, children first, from
    torch's global generator seeded as `generator`'s (the same draw as `torch.manual_seed(seed)` then
    `from_pretrained`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator.initial_seed())

        def walk(m: torch.nn.Module, name: str) -> None:
            for child_name, child in m.named_children():
                walk(child, f"{name}{child_name}.")
            own = [f"{name}{k}" for k, _ in m.named_parameters(recurse=False)]
            if own and all(o in missing for o in own):
                model._init_weights(m)
        walk(module, "")


class _Decoder(_Parts):
    """Llama, Mistral, Qwen2 as causal LMs: embed_tokens, decoder layers with rotary embeddings and causal masks,
    final norm + lm_head."""

    KIND, EXAMPLE, PATTERN = "a decoder", "model.layers.N.<module> (e.g. self_attn.q_proj)", LAYER_MODULE

    def __init__(self, ckpt, task, dtype, dev, **_):
        super().__init__(ckpt, task, "AutoModelForCausalLM", dtype, dev)
        self.layers = self.core.layers
        self.rotary = type(self.core.rotary_emb)(config=self.config).to(dev)

    def stored_dtype(self) -> str | None:
        stored = self.ckpt.tensors.get("model.embed_tokens.weight")
        return stored.dtype if stored is not None else None

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def embed(self, batches: list[_Batch]) -> Iterator[torch.Tensor]:
        embed = self.load(self.core.embed_tokens)
        for batch in batches:
            yield embed(batch.ids)
        self.unload(embed)

    def head_parts(self) -> list[torch.nn.Module]:
        return [self.load(self.core.norm), self.load(self.model.lm_head)]

    def head(self, parts: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        norm, lm_head = parts
        return lm_head(norm(x))

    def layer_kwargs(self, index: int, hidden: torch.Tensor, batch: _Batch) -> dict:
        """What the model's own forward passes to decoder layer `index`: mask, rotary cos/sin, positions."""
        if self.config.model_type == "qwen2":
            sliding = self.config.layer_types[index] == "sliding_attention"
        else:
            sliding = self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None) is not None
        make = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make(config=self.config, inputs_embeds=hidden, attention_mask=batch.attention,
                    position_ids=batch.positions, **_no_cache(make))
        return {"attention_mask": mask, "position_embeddings": self.rotary(hidden, batch.positions),
                "position_ids": batch.positions}


class _Encoder(_Parts):
    """BERT, RoBERTa, XLM-RoBERTa as masked LMs or sequence classifiers: embeddings (word, position, token type),
    encoder layers with the bidirectional padding mask, the MLM head or the classification head (BERT: pooler +
    classifier; RoBERTa: its two-layer head on the first token)."""

    KIND, EXAMPLE, PATTERN = "an encoder", "[bert.|roberta.]encoder.layer.N.<module> (e.g. attention.self.query)", \
        ENCODER_MODULE
    BUFFERS = {"position_ids": lambda config, shape: torch.arange(shape[-1]).expand(shape),
               "token_type_ids": lambda config, shape: torch.zeros(shape, dtype=torch.long)}

    def __init__(self, ckpt, task, dtype, dev, *, labels=None, seed=0):
        peft_type = {MASKED_LM: None, CLASSIFY: "SEQ_CLS"}[task]
        auto = auto_class(peft_type) or "AutoModelForMaskedLM"
        super().__init__(ckpt, task, auto, dtype, dev, overrides=labels if task == CLASSIFY else None)
        self.layers = self.core.encoder.layer
        self.pad_id = self.config.pad_token_id or 0
        self.generator = torch.Generator().manual_seed(seed)
        #: RoBERTa numbers positions from the padding index on, from the token ids; BERT from 0
        self.own_positions = hasattr(self.core.embeddings, "create_position_ids_from_input_ids")

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}.encoder.layer.{i}."

    def missing_hint(self) -> str:
        return f" (--task {self.task} needs the checkpoint's own {self.task} head)" if self.task == MASKED_LM else ""

    def embed(self, batches: list[_Batch]) -> Iterator[torch.Tensor]:
        embed = self.load(self.core.embeddings)
        for batch in batches:
            yield embed(input_ids=batch.ids, token_type_ids=batch.types,
                        position_ids=None if self.own_positions else batch.positions)
        self.unload(embed)

    def head_parts(self) -> list[torch.nn.Module]:
        if self.task == MASKED_LM:
            head = next(m for n, m in self.model.named_children() if n != self.prefix)
            return [self.load(head)]
        parts = [self.load(self.model.classifier, init=self.generator)]  # a new head: drawn as train draws it
        pooler = getattr(self.core, "pooler", None)
        return ([self.load(pooler, init=self.generator)] if pooler is not None else []) + parts

    def head(self, parts: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        if self.task == MASKED_LM:
            return parts[0](x)
        if len(parts) == 2:  # BERT: classifier(dropout(pooler(h))), dropout off
            return parts[1](parts[0](x[:, None]))
        return parts[0](x[:, None])  # RoBERTa's head reads the first token itself

    def layer_kwargs(self, index: int, hidden: torch.Tensor, batch: _Batch) -> dict:
        """What the model's own forward passes to encoder layer `index`: the bidirectional padding mask."""
        return {"attention_mask": create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                                            attention_mask=batch.attention)}

    def check_label(self, n: int, label) -> None:
        size = self.config.num_labels
        if self.regression != isinstance(label, float) or not self.regression and not 0 <= label < size:
            raise FormatError(f"calibration sample {n}: label {label!r} does not fit the head ({size} "
                              f"{'output: a number' if self.regression else 'classes: ids 0..' + str(size - 1)})")

    @property
    def regression(self) -> bool:
        return self.config.problem_type == "regression" or self.config.num_labels == 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == CLASSIFY and self.regression:
            return (logits[:, 0] - labels.float()).square()
        return super().loss(logits, labels)


def _no_cache(make) -> dict:
    """No KV cache, as this transformers' mask function spells it (`cache`; `past_key_values` before 5.x, deprecated
    since: passing it warns on every layer)."""
    import inspect

    return {"cache": None} if "cache" in inspect.signature(make).parameters else {"past_key_values": None}


class _Store:
    """Tensors by key, on the CPU: in RAM up to `budget` bytes, beyond that in files of a temporary directory."""

    def __init__(self, budget: int, scratch: str | os.PathLike | None):
        self.budget, self.used, self.scratch = budget, 0, scratch
        self.ram: dict[tuple, torch.Tensor] = {}
        self.files: dict[tuple, tuple[Path, torch.Size, torch.dtype]] = {}
        self.dir: Path | None = None

    def put(self, key: tuple, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self.used + n <= self.budget:
            self.ram[key], self.used = t, self.used + n
            return
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=".ailora-calibration-", dir=self.scratch))
        path = self.dir / ("-".join(map(str, key)) + ".bin")
        t.reshape(-1).view(torch.uint8).numpy().tofile(path)
        self.files[key] = (path, t.shape, t.dtype)

    def get(self, key: tuple, *, remove: bool = False) -> torch.Tensor:
        if key in self.ram:
            t = self.ram.pop(key) if remove else self.ram[key]
            self.used -= t.numel() * t.element_size() if remove else 0
            return t
        path, shape, dtype = self.files.pop(key) if remove else self.files[key]
        t = torch.from_file(str(path), shared=False, size=shape.numel(), dtype=dtype).reshape(shape)
        if remove:
            path.unlink()
        return t

    def close(self) -> None:
        self.ram.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class _Collector:
    """Hooks on one layer's target modules; sums in float32 on the device: Σxxᵀ per distinct input, Σg², Σgᵀx."""

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        self.handles, self.key, self.z, self.y, self.g = [], {}, {}, {}, {}
        self.tokens = 0
        for local, name in targets.items():
            m = layer.get_submodule(local)
            self.y[name] = torch.zeros(m.out_features, dtype=torch.float32, device=dev)
            self.g[name] = torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=dev)
            self.handles += [m.register_forward_pre_hook(partial(self._input, name)),
                             m.register_forward_hook(partial(self._output, name))]

    def start(self, batch: _Batch) -> None:
        self.batch, self.x, self.seen, self.real_x = batch, {}, [], {}
        self.tokens += int(batch.factor.sum())

    def _input(self, name: str, _module, args) -> None:
        key = next((k for seen, k in self.seen if seen is args[0]), None)
        if key is None:  # the first module to read this tensor names it and sums its Z
            key = name
            self.seen.append((args[0], key))
            x = args[0].detach()[self.batch.factor].float()
            if key not in self.z:
                self.z[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.z[key].addmm_(x.T, x)
        self.key[name], self.x[name] = key, args[0].detach()

    def _output(self, name: str, _module, _args, out: torch.Tensor) -> None:
        out.register_hook(partial(self._gradient, name))

    def _gradient(self, name: str, g: torch.Tensor) -> None:
        key = self.key[name]
        if key not in self.real_x:
            self.real_x[key] = self.x[name][self.batch.real].float()
        self.g[name].addmm_(g[self.batch.real].float().T, self.real_x[key])
        self.y[name].add_(g[self.batch.factor].float().square().sum(0))

    def results(self, samples: int, skipped: int, loss: float) -> list[ModuleStatistics]:
        for h in self.handles:
            h.remove()
        z = {k: (v / self.tokens).cpu() for k, v in self.z.items()}
        return [ModuleStatistics(name, self.key[name], z[self.key[name]], (self.y[name] / self.tokens).cpu(),
                                 (self.g[name] / samples).cpu(), self.tokens, samples, skipped, loss)
                for name in self.y]


def _run(net: _Parts, targets: dict[int, dict[str, str]], batches: list[_Batch], skipped: int,
         budget: int, scratch, progress: bool) -> Iterator[ModuleStatistics]:
    layers, first = len(net.layers), min(targets)
    samples = sum(len(b.ids) for b in batches)
    store = _Store(budget, scratch)
    bar = tqdm(total=2 * layers - first + 2, desc="LoRA-DA calibration", unit="step", disable=not progress)
    try:
        with torch.no_grad():
            for b, h in enumerate(net.embed(batches)):
                store.put(("h", 0, b), h)
            bar.update()
            for i in range(layers):  # forward, keeping the inputs of the layers the backward pass recomputes
                layer = net.load(net.layers[i])
                for b, batch in enumerate(batches):
                    h = store.get(("h", i, b), remove=i < first).to(net.device)
                    store.put(("h", i + 1, b), _output(layer(h, **net.layer_kwargs(i, h, batch))))
                net.unload(layer)
                bar.update()
        loss = _head(net, store, batches, layers) / samples
        bar.update()
        for i in range(layers - 1, first - 1, -1):  # backward, recomputing each layer from its input
            layer = net.load(net.layers[i])
            collector = _Collector(layer, targets[i], net.device) if i in targets else None
            for b, batch in enumerate(batches):
                h = store.get(("h", i, b), remove=True).to(net.device).requires_grad_(True)
                grad = store.get(("g", i + 1, b), remove=True).to(net.device)
                if collector is not None:
                    collector.start(batch)
                with torch.enable_grad():
                    out = _output(layer(h, **net.layer_kwargs(i, h, batch)))
                    out.backward(grad)
                if i > first:
                    store.put(("g", i, b), h.grad)
                del h, grad, out
            net.unload(layer)
            bar.update()
            if collector is not None:
                yield from collector.results(samples, skipped, loss)
    finally:
        bar.close()
        store.close()
        net.close()


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _head(net: _Parts, store: _Store, batches: list[_Batch], layers: int) -> float:
    """Σ over samples of their mean loss; puts ∂(Σ L_n)/∂h of the last hidden states in the store."""
    parts = net.head_parts()
    rows = max(1, HEAD_CHUNK_BYTES // (4 * net.config.vocab_size))
    total = 0.0
    for b, batch in enumerate(batches):
        h = store.get(("h", layers, b), remove=True).to(net.device).requires_grad_(True)
        for s in range(0, len(batch.rows), rows):
            part = slice(s, s + rows)
            with torch.enable_grad():
                logits = net.head(parts, h[batch.rows[part], batch.cols[part]]).float()
                loss = (net.loss(logits, batch.labels[part]) * batch.weights[part]).sum()
                loss.backward()
            total += float(loss.detach())
        store.put(("g", layers, b), h.grad)
        del h
    for part in parts:
        net.unload(part)
    return total
