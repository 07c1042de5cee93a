"""ailora-tools: AILoRA / PiSSA / MiLoRA initialisation, conversion and merging at real model sizes.

The pipeline's stages are subpackages (`init`, `decomposition`, `training`, `adapters`, `analysis`) over shared
ground (`io`, `manifests`, `options`, `errors`, ...); `docs/ARCHITECTURE.md` draws them. The public functions
are imported on first use (PEP 562), so `import ailora_tools` does not load torch and the CLI can start reading
and hashing files while torch loads.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"


def lazy_exports(package: str, table: dict[str, str], extra: tuple[str, ...] = ()):
    """`__getattr__` and `__dir__` (PEP 562) for `package`, whose public name N lives in its module `table[N]`."""

    def __getattr__(name: str):
        if name in table:
            return getattr(import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*table, *extra})

    return __getattr__, __dir__


_EXPORTS = {
    "AiloraError": "errors",
    "Checkpoint": "io.checkpoint",
    "decompose": "decomposition",
    "get_ailora_model": "training",
    "train": "training",
    "convert": "adapters",
    "merge": "adapters",
    "export_gguf": "adapters",
    "check_adapter": "adapters",
    "push": "adapters",
    "spectrum": "analysis",
    "compare": "comparison",
    "InitOptions": "options",
    "DecomposeOptions": "options",
    "TrainOptions": "options",
}
__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ("__version__",))
