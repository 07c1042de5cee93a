"""ailora-tools: AILoRA / PiSSA / MiLoRA initialisation, conversion and merging at real model sizes.

The public functions are imported on first use (PEP 562), so `import ailora_tools` does not load torch
and the CLI can start reading and hashing files while torch loads.
"""

__version__ = "0.1.0"

_EXPORTS = {"AiloraError": "errors", "Checkpoint": "checkpoint", "convert": "conversion", "decompose": "decomposition",
            "merge": "merging", "get_ailora_model": "peft_init", "spectrum": "spectra", "compare": "comparison"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ailora_tools' has no attribute {name!r}")
