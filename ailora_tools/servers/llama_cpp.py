"""llama.cpp, run for real: its own converter for a base model, and its logits with or without a LoRA GGUF.

llama.cpp lives in its own environment (llama-cpp-python built from its source distribution, whose vendored
llama.cpp holds `convert_hf_to_gguf.py` and gguf-py); it runs as a subprocess of that environment's interpreter, so
this module needs neither installed here.

Example:
    >>> base = convert_base("tiny-llama", "base.gguf")  # doctest: +SKIP
    >>> [t.shape for t in logits(base, [[1, 2, 3]], lora_gguf="adapter.gguf")]  # doctest: +SKIP
    [torch.Size([3, 32000])]
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import AiloraError, InputNotFoundError

VERSION = "0.3.36"  # the llama-cpp-python release .ci/servers builds (its sdist vendors llama.cpp)
PYTHON_ENV, SRC_ENV = "AILORA_LLAMA_CPP_PYTHON", "AILORA_LLAMA_CPP_SRC"
RECIPE = (
    f"build it with `bash .ci/servers llama.cpp` (llama-cpp-python=={VERSION} from its sdist, with its vendored "
    "gguf-py, in $AILORA_SERVERS or ~/.cache/ailora-ci/servers), or point "
    f"{PYTHON_ENV} (or --python) at an interpreter where `import llama_cpp` works"
)
WORKER = Path(__file__).with_name("_llama_cpp_worker.py")


def cached_env() -> Path:
    """The environment `.ci/servers llama.cpp` builds (it may not exist), under $AILORA_SERVERS as `.ci/servers`
    puts it."""
    root = Path(os.environ.get("AILORA_SERVERS") or Path.home() / ".cache" / "ailora-ci" / "servers")
    return root / f"llama.cpp-{VERSION}"


class LlamaCppError(AiloraError, RuntimeError):
    """llama.cpp (its converter or its runtime) failed on a model or adapter; the message ends with its own words."""


def _has_llama_cpp(python: str) -> bool:
    if Path(python).absolute() == Path(sys.executable).absolute():
        return importlib.util.find_spec("llama_cpp") is not None
    try:
        return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_python(python: str | None = None) -> str:
    """The interpreter of an environment where `import llama_cpp` works.

    Looked for in order: `python`, the environment variable AILORA_LLAMA_CPP_PYTHON, the cached CI build
    (`cached_env`), the current interpreter.

    Raises:
        InputNotFoundError: none has llama_cpp (the message gives the install recipe).
    """
    if python or os.environ.get(PYTHON_ENV):
        chosen = python or os.environ[PYTHON_ENV]
        if not _has_llama_cpp(chosen):
            flag = "--python" if python else PYTHON_ENV
            raise InputNotFoundError(f"{flag} {chosen}: `import llama_cpp` fails there; {RECIPE}")
        return chosen
    for candidate in (cached_env() / "bin" / "python", Path(sys.executable)):
        if candidate.is_file() and _has_llama_cpp(str(candidate)):
            return str(candidate)
    raise InputNotFoundError(f"llama.cpp: no interpreter with llama_cpp found; {RECIPE}")


def source_dir(python: str | None = None) -> Path:
    """llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py): AILORA_LLAMA_CPP_SRC, else the llama-cpp-python sdist
    unpacked beside the environment of `find_python(python)` (its src/vendor/llama.cpp, as .ci/servers lays it out)."""
    where = os.environ.get(SRC_ENV)
    src = Path(where) if where else Path(find_python(python)).parent.parent / "src" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        how = f"{SRC_ENV}={where}" if where else f"{src}"
        raise InputNotFoundError(
            f"llama.cpp: no convert_hf_to_gguf.py in {how}; point {SRC_ENV} at the llama.cpp "
            f"source tree (vendor/llama.cpp of the llama-cpp-python sdist), or {RECIPE}"
        )
    return src


def _run(cmd: list[str], what: str, timeout: float, cwd: str | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise LlamaCppError(f"{what}: no answer after {timeout:.0f} s") from e
    if done.returncode:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LlamaCppError(f"{what} failed (exit {done.returncode}): {tail}")


def convert_base(
    model_dir: str | os.PathLike, out_gguf: str | os.PathLike, *, outtype: str = "f32", python: str | None = None
) -> Path:
    """Convert a HF model directory to a GGUF with llama.cpp's own convert_hf_to_gguf.py.

    Args:
        model_dir: the model (config.json, safetensors, a tokenizer the converter reads).
        out_gguf: the .gguf file to write. outtype: the converter's --outtype (f32, f16, bf16, q8_0, ...).
        python: the llama.cpp environment's interpreter (see `find_python`).

    Returns:
        The written file's path.

    Raises:
        InputNotFoundError: no llama.cpp environment or source tree. LlamaCppError: the converter failed.
    """
    return convert_bases([(model_dir, out_gguf)], outtype=outtype, python=python)[0]


def convert_bases(
    models: list[tuple[str | os.PathLike, str | os.PathLike]], *, outtype: str = "f32", python: str | None = None
) -> list[Path]:
    """`convert_base` for several (model_dir, out_gguf) pairs in one converter process (its imports paid once)."""
    for model_dir, _ in models:
        if not (Path(model_dir) / "config.json").is_file():
            raise InputNotFoundError(f"{model_dir}: no config.json; pass a HF model directory")
    python = find_python(python)
    script = source_dir(python) / "convert_hf_to_gguf.py"
    argvs = [[str(script), str(m), "--outfile", str(o), "--outtype", outtype] for m, o in models]
    driver = (
        f"import runpy, sys\nsys.path.insert(0, {str(script.parent)!r})\n"
        f"for argv in {argvs!r}:\n"
        "    sys.argv = argv\n"
        "    runpy.run_path(argv[0], run_name='__main__')\n"
    )
    names = ", ".join(str(m) for m, _ in models)
    _run([python, "-c", driver], f"llama.cpp's convert_hf_to_gguf.py on {names}", timeout=1800)
    return [Path(o) for _, o in models]


def logits(
    base_gguf: str | os.PathLike,
    prompts: list[list[int]],
    *,
    lora_gguf: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    python: str | None = None,
) -> list[torch.Tensor]:
    """llama.cpp's logits at every position of each prompt (float32 KV cache, no flash attention).

    Args:
        base_gguf: the model GGUF. prompts: token ids, one list per prompt (all positions are scored).
        lora_gguf: a LoRA GGUF applied at `lora_scale` (llama.cpp's --lora-scaled). python: see `find_python`.

    Returns:
        One float32 tensor [len(prompt), vocab] per prompt.

    Raises:
        InputNotFoundError: a missing GGUF or llama.cpp environment. LlamaCppError: llama.cpp failed (e.g. refused
        the adapter).
    """
    for f in (base_gguf, lora_gguf):
        if f is not None and not Path(f).is_file():
            raise InputNotFoundError(f"{f}: no such GGUF file")
    python = find_python(python)
    with tempfile.TemporaryDirectory(prefix="ailora-llama-cpp-") as tmp:
        job, out = Path(tmp, "job.json"), Path(tmp, "logits.npz")
        n_ctx = max(8, max((len(p) for p in prompts), default=1))
        job.write_text(
            json.dumps(
                {
                    "base": str(base_gguf),
                    "lora": str(lora_gguf) if lora_gguf else None,
                    "lora_scale": float(lora_scale),
                    "prompts": [list(map(int, p)) for p in prompts],
                    "n_ctx": n_ctx,
                }
            )
        )
        what = f"llama.cpp on {base_gguf}" + (f" with {lora_gguf}" if lora_gguf else "")
        # run as -c code in an empty folder: as a script, its own folder would shadow llama_cpp with this module
        _run([python, "-c", WORKER.read_text(), str(job), str(out)], what, timeout=600, cwd=tmp)
        with np.load(out) as data:
            return [torch.from_numpy(data[f"p{i}"].copy()) for i in range(len(prompts))]
