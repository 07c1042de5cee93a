"""`serve-check`: serve an export with the real server and compare what it serves with the trained model.

DIR is what the user will serve; what it serves and the trained model it must reproduce are read from its
manifests (`export_of`, `reference.trained_of`):

- a `convert` / `convert --for` output (a LoRA): on the original model its config names;
- a `convert --dora exact` output: OUT/adapter on OUT/base;
- an `export-base` output: OUT/base with OUT/adapter (vLLM, W4A16: served in bfloat16, the only dtype vLLM's CPU
  build runs it in), OUT/base.gguf with OUT/adapter.gguf (llama.cpp);
- a merged model (`merge`): alone;
- any other PEFT LoRA: on its config's `base_model_name_or_path` (a trained adapter: its residual).

For llama.cpp, a model directory is converted with llama.cpp's own converter and a LoRA directory exported with
`export-gguf` (unless DIR holds its GGUF), in a temporary directory. The log-probabilities of each prompt's tokens
are compared with the trained model's in transformers (float32); the worst difference per prompt is reported.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputNotFoundError, OptionError
from ..io.peft_adapter import CONFIG_NAME
from ..manifests import (
    ADAPTER_DIR,
    CONVERT_MANIFEST,
    DORA_BASE_DIR,
    EXPORT_BASE_MANIFEST,
    MERGE_MANIFEST,
    read_manifest,
)
from ..options import SERVERS, at_least, choice
from .reference import Trained, reference_logprobs, trained_of

#: (server, base format) -> the largest |served − trained| log-probability accepted by default: float32 serving
#: (measured 1e-6 on vLLM, 2e-4 on llama.cpp), vLLM's W4A16 base in bfloat16, llama.cpp's quantised bases
TOLERANCES = {
    ("vllm", None): 1e-3,
    ("vllm", "w4a16"): 0.15,
    ("llama.cpp", None): 2e-3,
    ("llama.cpp", "q8_0"): 0.05,
    ("llama.cpp", "q4_0"): 0.25,
}
PROMPTS, PROMPT_TOKENS = 4, 16


@dataclass(frozen=True)
class Export:
    """What a directory serves (`model`, with `lora` if any) and the trained model it must reproduce."""

    kind: str  # "lora", "dora-exact", "export-base", "merged"
    model: str
    lora: str | None
    trained: Trained
    fmt: str | None = None  # export-base's weight format

    def describe(self) -> str:
        return f"{self.lora} on {self.model}" if self.lora else self.model


def export_of(directory: str | os.PathLike, server: str) -> Export:
    """What `directory` serves on `server` and the trained model it stands for, from its manifests.

    Raises:
        InputNotFoundError: a directory that is no export, LoRA or model.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputNotFoundError(f"{d}: no such directory")
    converted, based = read_manifest(d / CONVERT_MANIFEST), read_manifest(d / EXPORT_BASE_MANIFEST)
    if converted.get("dora") == "exact":
        return Export("dora-exact", str(d / DORA_BASE_DIR), str(d / ADAPTER_DIR), trained_of(converted["trained"]))
    if based:
        if not based.get("adapter"):
            raise InputNotFoundError(f"{d}: export-base wrote no adapter here (--adapter): nothing trained to compare")
        files = ("base", ADAPTER_DIR) if based["server"] == "vllm" else ("base.gguf", "adapter.gguf")
        if based["server"] != server:
            raise OptionError(f"--server {server}: {d} is export-base's output for {based['server']}")
        return Export(
            "export-base", str(d / files[0]), str(d / files[1]), trained_of(based["adapter"]), based.get("format")
        )
    merged = read_manifest(d / MERGE_MANIFEST)
    if merged:
        summary = merged.get("summary") or {}
        return Export("merged", str(d), None, trained_of(summary["adapter"], base=summary.get("base")))
    config = read_manifest(d / CONFIG_NAME)
    if config.get("peft_type"):
        base = config.get("base_model_name_or_path")
        if not base:
            raise InputNotFoundError(f"{d}/{CONFIG_NAME} names no base_model_name_or_path to serve it on")
        return Export("lora", str(base), str(d), trained_of(d, base=base))
    raise InputNotFoundError(
        f"{d}: not a convert, export-base or merge output, nor a PEFT LoRA (no "
        f"{CONVERT_MANIFEST}, {EXPORT_BASE_MANIFEST}, {MERGE_MANIFEST} or {CONFIG_NAME})"
    )


def serve_check(
    directory: str | os.PathLike,
    *,
    server: str,
    prompts: str | os.PathLike | None = None,
    tolerance: float | None = None,
    python: str | os.PathLike | None = None,
) -> dict:
    """Serve `directory` with the real `server` and compare its prompt log-probabilities with the trained model's.

    Args:
        directory: what will be served (see the module's list).
        server: "vllm" or "llama.cpp".
        prompts: a file, one prompt a line: a JSON list of token ids, or text (tokenized with the model's
            tokenizer); default: a few fixed random prompts.
        tolerance: the largest |served − trained| log-probability accepted (default: `TOLERANCES`).
        python: the interpreter of the server's environment (default: found as `vllm.find_python` /
            `llama_cpp.find_python` say).

    Returns:
        Summary: directory, server, kind, served, trained, tolerance, per-prompt worst differences, worst, passes.

    Raises:
        InputNotFoundError: no server environment (the message says how to build one), no such directory.
        VllmError, LlamaCppError: the server failed.

    Example:
        >>> serve_check("lora", server="vllm")["passes"]  # doctest: +SKIP
        True
    """
    choice("--server", server, SERVERS)
    at_least("--tolerance", tolerance, 0)
    exe = _find_python(server, python)  # before any work: no environment, one line with the recipe
    export = export_of(directory, server)
    ids = read_prompts(prompts, export) if prompts is not None else default_prompts(export)
    served = _serve(export, server, ids, exe)
    reference = reference_logprobs(export.trained, ids)
    worst = [float((s - r).abs().max()) for s, r in zip(served, reference)]
    limit = tolerance if tolerance is not None else TOLERANCES[(server, export.fmt)]
    return {
        "directory": str(directory),
        "server": server,
        "kind": export.kind,
        "served": export.describe(),
        "trained": export.trained.describe(),
        "tolerance": limit,
        "prompt_tokens": [len(p) for p in ids],
        "per_prompt": worst,
        "worst": max(worst),
        "passes": max(worst) <= limit,
    }


def _find_python(server: str, python) -> str:
    if server == "vllm":
        from .vllm import find_python
    else:
        from .llama_cpp import find_python
    return find_python(python)


def _serve(export: Export, server: str, ids: list[list[int]], exe: str) -> list[torch.Tensor]:
    """The served log-probabilities of each prompt's tokens."""
    if server == "vllm":
        from .vllm import Run, serve_runs

        dtype = "bfloat16" if export.fmt == "w4a16" else "float32"  # vLLM's CPU W4A16 kernel takes no float32
        return serve_runs([Run(export.model, (export.lora,), dtype=dtype)], ids, python=exe)[0][0]
    from .llama_cpp import logits

    with tempfile.TemporaryDirectory(prefix="ailora-serve-check-") as tmp:
        base, lora = _as_gguf(export, Path(tmp), exe)
        found = logits(base, ids, lora_gguf=lora, python=exe)
    return [
        torch.log_softmax(x.double(), dim=-1)[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        for x, p in zip(found, ids)
    ]


def _as_gguf(export: Export, tmp: Path, exe: str) -> tuple[Path, Path | None]:
    """The base and LoRA GGUFs llama.cpp loads: as exported, or converted here (llama.cpp's own converter for the
    base, `export-gguf` for a LoRA directory without its GGUF)."""
    from .llama_cpp import convert_base

    if export.kind == "export-base":
        return Path(export.model), Path(export.lora)
    base = convert_base(export.model, tmp / "base.gguf", python=exe)
    if export.lora is None:
        return base, None
    found = sorted(Path(export.lora).glob("*.gguf"))
    if len(found) == 1:
        return base, found[0]
    from ..adapters import export_gguf

    export_gguf(export.lora, base=export.model, out=tmp / "adapter.gguf")
    return base, tmp / "adapter.gguf"


def default_prompts(export: Export) -> list[list[int]]:
    """PROMPTS fixed random prompts of PROMPT_TOKENS token ids drawn from the model's vocabulary."""
    vocab = int(_config(export).get("vocab_size") or 100)
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(3, vocab - 1), vocab, (PROMPTS, PROMPT_TOKENS), generator=g).tolist()


def read_prompts(path: str | os.PathLike, export: Export) -> list[list[int]]:
    """The prompts of a file: one a line, a JSON list of token ids or text (the model's tokenizer)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"--prompts {p}: no such file")
    lines = [s for s in p.read_text().splitlines() if s.strip()]
    ids, tokenizer = [], None
    for line in lines:
        if line.lstrip().startswith("["):
            ids.append([int(t) for t in json.loads(line)])
            continue
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(export.trained.base)
        ids.append(tokenizer(line)["input_ids"])
    if not ids or any(len(x) < 2 for x in ids):
        raise OptionError(f"--prompts {p}: needs prompts of at least 2 tokens, one a line")
    return ids


def _config(export: Export) -> dict:
    return read_manifest(Path(export.trained.base) / "config.json")
