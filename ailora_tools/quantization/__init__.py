"""Quantised weights (shared ground): bitsandbytes NF4 quantised and read back one matrix at a time (`nf4`); the
on-disk layout transformers loads is storage (`io.nf4_layout`). bitsandbytes
is optional (`pip install 'ailora-tools[quant]'`) and loads only when a matrix is quantised or dequantised, never
when this package is imported."""

from .. import lazy_exports

_EXPORTS = {n: "nf4" for n in ("quantize", "dequantize", "read_dequantized", "linear4bit")}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
