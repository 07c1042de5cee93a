"""Stage 4, serve: turn a trained adapter into what runs elsewhere (a LoRA on the original base, merged weights, a
llama.cpp GGUF), check it against a server's rules, publish it."""

from .. import lazy_exports

_EXPORTS = {
    "convert": "conversion",
    "merge": "merging",
    "export_gguf": "gguf_export",
    "check_adapter": "check",
    "push": "hub",
    "export_for": "serving",
    "convert_dora": "dora",
    "export_base": "server_base",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
