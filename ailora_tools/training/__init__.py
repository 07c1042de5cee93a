"""Stage 3, train: the adapter on its frozen base (residual, or the original in exact mode), for causal LM, masked LM
or sequence classification, optionally with progressive freezing; `get_ailora_model` for your own trainer."""

from .. import lazy_exports

_EXPORTS = {"train": "trainer", "get_ailora_model": "peft_model"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
