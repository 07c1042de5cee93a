"""Stage 5, the real servers: run llama.cpp and vLLM on what the adapters stage exports, in their own environments
(each server pins its own builds; it runs as a subprocess of its interpreter), to compare with transformers.

Modules: `llama_cpp` (llama.cpp's own base converter, and its logits with or without a LoRA GGUF), `vllm` (vLLM's
prompt log-probabilities, several models and LoRAs in one process), `reference` (the trained model the manifests
name, in transformers), `check` (`serve_check`: an export served against the trained model)."""

from .. import lazy_exports

_EXPORTS = {"serve_check": "check"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
