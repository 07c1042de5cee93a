"""ailora-tools: AILoRA / PiSSA / MiLoRA initialisation, conversion and merging at real model sizes.

The pipeline's stages are subpackages (`init`, `decomposition`, `training`, `adapters`, `analysis`) over shared
ground (`io`, `manifests`, `options`, `errors`, ...); `docs/ARCHITECTURE.md` draws them. The public functions
are imported on first use (PEP 562), so `import ailora_tools` does not load torch and the CLI can start reading
and hashing files while torch loads.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
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
    "AiloraError": "errors", "Checkpoint": "io.checkpoint",
    "decompose": "decomposition", "get_ailora_model": "training", "train": "training",
    "convert": "adapters", "merge": "adapters", "export_gguf": "adapters", "check_adapter": "adapters", "push": "adapters",
    "spectrum": "analysis", "compare": "comparison",
    "InitOptions": "options", "DecomposeOptions": "options", "TrainOptions": "options",
}
__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ("__version__",))

#: Modules that moved into the stage subpackages in 0.2, by their old name: `import ailora_tools.calibration` and
#: `from ailora_tools.lora_da import ...` keep working (the README of 0.1 named them). Not `ailora_tools.train`: that
#: name is the function now (`from ailora_tools import train`); the module is `ailora_tools.training.trainer`.
MOVED = {
    "calibration": "init.lora_da.calibration", "lora_da": "init.lora_da.maths", "svd": "init.svd",
    "targets": "init.targets", "residual": "decomposition.residual",
    "tasks": "training.tasks", "progressive": "training.progressive", "initial_offset": "training.exact_mode",
    "peft_init": "training.peft_model", "data": "io.examples", "tokenizer": "io.tokenizer",
    "peft_format": "io.peft_adapter", "conversion": "adapters.conversion", "merging": "adapters.merging",
    "gguf_export": "adapters.gguf_export", "check": "adapters.check", "hub": "adapters.hub",
    "spectra": "analysis.spectra", "plots": "analysis.plots",
    "provenance": "manifests", "model_names": "architectures",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `ailora_tools.OLD` as a module that forwards every attribute to its new home."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == __name__ and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new = import_module(f"{__name__}.{MOVED[module.__name__.rpartition('.')[2]]}")
        module.__getattr__ = lambda name: getattr(new, name)
        module.__doc__ = f"Moved to {new.__name__}: {new.__doc__ or ''}"


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
