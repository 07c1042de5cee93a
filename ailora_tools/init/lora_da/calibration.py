"""LoRA-DA calibration statistics at bounded memory, one decoder layer at a time.

For each target linear module W [out, in] of a Llama, Mistral or Qwen2 checkpoint, and calibration
samples (`data.Example`: token ids, labels -100 where no loss is taken), `calibrate` yields:

- Z = E[x xᵀ], the second moment of the module's input over tokens (the K-FAC input factor). Modules
  that read the same tensor (q/k/v, gate/up) share one Z, computed once;
- the output factor E[g²], the diagonal second moment of g = ∂L_n/∂y, the gradient of sample n's loss
  with respect to the module's output y, over the same tokens;
- G = ∂L/∂W = (1/N) Σ_n ∂L_n/∂W, where L_n is sample n's mean cross-entropy over its loss tokens
  (positions whose next label is not -100): the trainer's loss at batch size 1, as in the authors' code.

Which tokens Z and E[g²] average over is the authors' `fisher_token_mask`: "attention" (their default)
takes every token of every sample, prompt included; "labels" only the positions whose logits enter the
loss. Both are token-weighted means over all samples, as theirs. G sums over every token: prompt tokens
get gradient too, through attention. Samples without a loss token are left out (and counted).

How. The model is never loaded: transformers builds the checkpoint's model class from its config on the
meta device, and each part (embeddings, one decoder layer, final norm + lm_head) is materialised with
`to_empty` and filled from the shards (`Checkpoint` + `read_tensor`) only while it runs. Forward:
embeddings, then layer by layer over all samples without autograd, keeping each layer's input; the norm
and lm_head, applied at loss positions only and in chunks, give the loss and its gradient with respect
to the last hidden states. Backward: from the top layer down to the lowest layer that has a target,
each layer is recomputed from its saved input with autograd; hooks on the target modules take x and g,
and the gradient with respect to the layer's input is passed down. Attention, rotary embeddings and
masks are transformers' own. The checkpoint is read twice. Layer inputs and gradients stay in RAM up to
`activation_budget` bytes, beyond that in files in a temporary directory, removed at the end; the disk
needs up to (layers − lowest target layer + 2) × samples × longest sample × hidden × b bytes.

Peak memory above the process's after importing this module (CPU; `memory_bound` computes it):

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
from transformers import AutoConfig, AutoModelForCausalLM

try:  # transformers.masking_utils exists since 4.53; the call below needs 5.4 (see `require_transformers`)
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )
except ImportError:
    create_causal_mask = create_sliding_window_causal_mask = None

from ...devices import resolve_device
from ...errors import FormatError, TargetError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.examples import IGNORE, Example
from ...io.tensorio import DTYPE_FLAGS, DTYPES, read_tensor, torch_dtype

#: model_type values whose decoder layers calibrate
SUPPORTED = ("llama", "mistral", "qwen2")
TOKEN_MASKS = ("attention", "labels")
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
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
    examples: Sequence[Example],
    modules: Sequence[str],
    *,
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
        examples: calibration samples (token ids and labels, -100 where no loss is taken).
        modules: full names of target linear modules inside decoder layers, e.g.
            "model.layers.3.self_attn.q_proj".
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
        UnsupportedError: a model_type other than llama, mistral, qwen2; a bad dtype, token_mask, device; a
            transformers older than 5.4.
        TargetError: a module that is not a linear module inside a decoder layer.
        FormatError: no sample has a loss token; a token id outside the vocabulary; a tensor missing or
            of the wrong shape in the checkpoint.

    Example:
        >>> stats = {s.name: s for s in calibrate("./llama", examples, ["model.layers.0.self_attn.q_proj"])}  # doctest: +SKIP
    """
    require_transformers()
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    model_type = ckpt.config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedError(f"{ckpt.source}: model_type {model_type!r} is not supported by LoRA-DA calibration; "
                               f"supported: {', '.join(SUPPORTED)}")
    if token_mask not in TOKEN_MASKS:
        raise UnsupportedError(f"token_mask {token_mask!r}: choose one of {', '.join(TOKEN_MASKS)}")
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise UnsupportedError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_FLAGS)}")
    if batch_size < 1 or activation_budget < 0:
        raise UnsupportedError(f"batch_size {batch_size} / activation_budget {activation_budget}: "
                               "need batch_size >= 1 and activation_budget >= 0")
    dev = resolve_device(device)
    net = _MetaModel(ckpt, _compute_dtype(ckpt, dtype), dev)
    targets = net.targets(modules)
    batches, skipped = _batches(examples, batch_size, token_mask, net.config.vocab_size, dev)
    return _run(net, targets, batches, skipped, activation_budget, scratch, progress)


def require_transformers() -> None:
    """Check that transformers' mask functions take what `_MetaModel.layer_kwargs` passes: `inputs_embeds=` and no
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


def _compute_dtype(ckpt: Checkpoint, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        return torch_dtype(DTYPE_FLAGS[dtype])
    stored = ckpt.tensors.get("model.embed_tokens.weight")
    return torch.bfloat16 if stored is not None and stored.dtype == "BF16" else torch.float32


@dataclass
class _Batch:
    """One right-padded micro-batch on the compute device."""

    ids: torch.Tensor  # [B, T] long
    attention: torch.Tensor  # [B, T] long, 1 on real tokens
    positions: torch.Tensor  # [B, T] long
    real: torch.Tensor  # [B, T] bool: tokens G sums over
    factor: torch.Tensor  # [B, T] bool: tokens Z and E[g²] average over
    rows: torch.Tensor  # [K] sample index of each loss position
    cols: torch.Tensor  # [K] position whose logits predict the next label
    labels: torch.Tensor  # [K] the next labels
    weights: torch.Tensor  # [K] float32, 1 / (loss positions of that sample)


def _batches(examples: Sequence[Example], size: int, token_mask: str, vocab: int,
             dev: torch.device) -> tuple[list[_Batch], int]:
    kept = []
    for n, e in enumerate(examples):
        if len(e.input_ids) != len(e.labels) or not e.input_ids:
            raise FormatError(f"calibration sample {n}: {len(e.input_ids)} token ids but {len(e.labels)} labels; "
                              "they must match and not be empty")
        bad = next((t for t in e.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise FormatError(f"calibration sample {n}: token id {bad} is outside the model's vocabulary of {vocab}; "
                              "tokenize with the model's own tokenizer")
        if any(label != IGNORE for label in e.labels[1:]):
            kept.append(e)
    if not kept:
        raise FormatError(f"calibration data: none of the {len(examples)} samples has a loss token (a label other "
                          "than -100 after the first position); give samples with completion tokens")
    out = []
    for start in range(0, len(kept), size):
        group = kept[start:start + size]
        T = max(len(e.input_ids) for e in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        labels = torch.full((len(group), T), IGNORE, dtype=torch.long)
        attention = torch.zeros(len(group), T, dtype=torch.long)
        for i, e in enumerate(group):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
            attention[i, :len(e.input_ids)] = 1
        loss = torch.zeros(len(group), T, dtype=torch.bool)
        loss[:, :-1] = labels[:, 1:] != IGNORE
        rows, cols = loss.nonzero(as_tuple=True)
        weights = (1.0 / loss.sum(1).to(torch.float32))[rows]
        out.append(_Batch(ids.to(dev), attention.to(dev), torch.arange(T).expand(len(group), T).to(dev),
                          attention.bool().to(dev), (attention.bool() if token_mask == "attention" else loss).to(dev),
                          rows.to(dev), cols.to(dev), labels[rows, cols + 1].to(dev), weights.to(dev)))
    return out, len(examples) - len(kept)


class _MetaModel:
    """The checkpoint's model class on the meta device; parts are materialised from the shards one at a time."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, dev: torch.device):
        self.ckpt, self.dtype, self.device = ckpt, dtype, dev
        config = AutoConfig.for_model(**ckpt.config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config).to(dtype).requires_grad_(False).eval()
        self.config = self.model.config
        self.core = self.model.model
        self.rotary = type(self.core.rotary_emb)(config=self.config).to(dev)
        self.where = {name: shard for shard, header in ckpt.headers.items() for name in header.tensors}
        self.fds: dict[str, int] = {}

    def targets(self, modules: Sequence[str]) -> dict[int, dict[str, str]]:
        """layer index -> {name inside the layer: full module name}."""
        layers = len(self.core.layers)
        out: dict[int, dict[str, str]] = {}
        for name in modules:
            found = LAYER_MODULE.match(name)
            ok = found is not None and int(found.group(1)) < layers
            if ok:
                try:
                    ok = isinstance(self.model.get_submodule(name), torch.nn.Linear)
                except AttributeError:
                    ok = False
            if not ok:
                raise TargetError(f"{name}: not a linear module inside a decoder layer of {self.ckpt.source}; "
                                  "LoRA-DA calibrates modules named model.layers.N.<module> (e.g. self_attn.q_proj)")
            out.setdefault(int(found.group(1)), {})[found.group(2)] = name
        if not out:
            raise TargetError(f"{self.ckpt.source}: no target modules given for LoRA-DA calibration")
        return out

    def load(self, module: torch.nn.Module, prefix: str, names: dict[str, str] | None = None) -> torch.nn.Module:
        """Materialise `module` on the device and fill it from the shards (tensor `prefix + name`, or names[name])."""
        if next(module.buffers(), None) is not None:  # to_empty would leave them uninitialised
            raise UnsupportedError(f"{self.ckpt.source}: {prefix or 'lm_head.'}* holds buffers, which this "
                                   "transformers version's layers did not; LoRA-DA calibration cannot fill them")
        module.to_empty(device=self.device)
        with torch.no_grad():
            for local, param in module.named_parameters():
                name = (names or {}).get(local, prefix + local)
                if name not in self.where:
                    raise FormatError(f"{self.ckpt.source}: tensor {name!r} is missing; the shards do not match "
                                      "config.json")
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
        return module

    @staticmethod
    def unload(module: torch.nn.Module) -> None:
        module.to_empty(device="meta")
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def head_names(self) -> dict[str, str]:
        tied = "lm_head.weight" not in self.where and getattr(self.config, "tie_word_embeddings", False)
        return {"weight": "model.embed_tokens.weight" if tied else "lm_head.weight"}

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

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


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


def _run(net: _MetaModel, targets: dict[int, dict[str, str]], batches: list[_Batch], skipped: int,
         budget: int, scratch, progress: bool) -> Iterator[ModuleStatistics]:
    layers, first = len(net.core.layers), min(targets)
    samples = sum(len(b.ids) for b in batches)
    store = _Store(budget, scratch)
    bar = tqdm(total=2 * layers - first + 2, desc="LoRA-DA calibration", unit="step", disable=not progress)
    try:
        with torch.no_grad():
            embed = net.load(net.core.embed_tokens, "model.embed_tokens.")
            for b, batch in enumerate(batches):
                store.put(("h", 0, b), embed(batch.ids))
            net.unload(embed)
            bar.update()
            for i in range(layers):  # forward, keeping the inputs of the layers the backward pass recomputes
                layer = net.load(net.core.layers[i], f"model.layers.{i}.")
                for b, batch in enumerate(batches):
                    h = store.get(("h", i, b), remove=i < first).to(net.device)
                    store.put(("h", i + 1, b), _output(layer(h, **net.layer_kwargs(i, h, batch))))
                net.unload(layer)
                bar.update()
        loss = _head(net, store, batches, layers) / samples
        bar.update()
        for i in range(layers - 1, first - 1, -1):  # backward, recomputing each layer from its input
            layer = net.load(net.core.layers[i], f"model.layers.{i}.")
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


def _head(net: _MetaModel, store: _Store, batches: list[_Batch], layers: int) -> float:
    """Σ over samples of their mean loss; puts ∂(Σ L_n)/∂h of the last hidden states in the store."""
    norm = net.load(net.core.norm, "model.norm.")
    head = net.load(net.model.lm_head, "", net.head_names())
    rows = max(1, HEAD_CHUNK_BYTES // (4 * net.config.vocab_size))
    total = 0.0
    for b, batch in enumerate(batches):
        h = store.get(("h", layers, b), remove=True).to(net.device).requires_grad_(True)
        for s in range(0, len(batch.rows), rows):
            part = slice(s, s + rows)
            with torch.enable_grad():
                logits = head(norm(h[batch.rows[part], batch.cols[part]])).float()
                ce = torch.nn.functional.cross_entropy(logits, batch.labels[part], reduction="none")
                loss = (ce * batch.weights[part]).sum()
                loss.backward()
            total += float(loss.detach())
        store.put(("g", layers, b), h.grad)
        del h
    net.unload(norm)
    net.unload(head)
    return total
