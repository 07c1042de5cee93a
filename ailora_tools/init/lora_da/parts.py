"""The checkpoint's model class built on the meta device, whose parts (embeddings, one layer, the head) are
materialised from the shards one at a time, only while they run; `decoder` and `encoder` say what the parts are."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import torch
import transformers
from transformers import AutoConfig

from ...errors import FormatError, TargetError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.tensorio import DTYPE_FLAGS, read_tensor, torch_dtype

try:  # glibc's malloc_trim, to give freed heap memory back after each layer
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


class ModelParts:
    """The checkpoint's model class on the meta device; parts are materialised from the shards one at a time.

    A subclass (one per kind of model) says what the parts are: `embeddings`, `layers`, `head_parts`, and how they
    run: `embed`, `layer_kwargs`, `head`."""

    #: buffers a part may hold, and how the model's constructor fills them (config -> tensor)
    BUFFERS: dict = {}

    def __init__(
        self,
        ckpt: Checkpoint,
        task: str,
        auto: str,
        dtype: str | None,
        dev: torch.device,
        overrides: dict | None = None,
    ):
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
        for local, _buf in module.named_buffers():
            if local.rsplit(".", 1)[-1] not in self.BUFFERS:  # to_empty would leave them uninitialised
                raise UnsupportedError(
                    f"{self.ckpt.source}: {local} is a buffer this transformers version's "
                    "layers did not hold; LoRA-DA calibration cannot fill it"
                )
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
                        raise FormatError(
                            f"{self.ckpt.source}: tensor {model_name!r} is missing; the shards do not "
                            "match config.json" + self.missing_hint()
                        )
                    missing.add(local)
                    continue
                shard = self.where[name]
                header = self.ckpt.headers[shard]
                if shard not in self.fds:
                    self.fds[shard] = os.open(header.path, os.O_RDONLY)
                tensor = read_tensor(header, name, self.fds[shard])
                if tuple(tensor.shape) != tuple(param.shape):
                    raise FormatError(
                        f"{header.path}: tensor {name!r} has shape {list(tensor.shape)}, but the config "
                        f"implies {list(param.shape)}"
                    )
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
                raise TargetError(
                    f"{name}: not a linear module inside {self.KIND} layer of {self.ckpt.source}; "
                    f"LoRA-DA calibrates modules named {self.EXAMPLE}"
                )
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


def _compute_dtype(stored: str | None, dtype: str | None) -> torch.dtype:
    """The compute dtype: `dtype`, or bfloat16 for a bfloat16 checkpoint (`stored`: its embeddings' dtype), else
    float32."""
    if dtype is not None:
        return torch_dtype(DTYPE_FLAGS[dtype])
    return torch.bfloat16 if stored == "BF16" else torch.float32
