"""Stage 5, served: the real servers (vLLM, llama.cpp) run on what the toolkit exports, each in its own environment,
and `serve_check`, which compares what they serve with the trained model."""
from .. import lazy_exports

_EXPORTS = {"serve_check": "check"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
