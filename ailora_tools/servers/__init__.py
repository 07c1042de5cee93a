"""Stage 5, the real servers: run llama.cpp (and vLLM) on what the adapters stage exports, in their own environments
(each server pins its own builds; it runs as a subprocess of its interpreter), to compare with transformers.

Modules: `llama_cpp` (llama.cpp's own base converter, and its logits with or without a LoRA GGUF)."""

__all__: list[str] = []
