"""Stage 2, decompose: plan the target matrices of a checkpoint, compute each one's factors with its init method,
write the residual (one rank-r product per target) and the initial adapter, streamed shard by shard."""

from .. import lazy_exports

_EXPORTS = {"decompose": "pipeline", "plan": "pipeline", "residual_target": "residual"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
