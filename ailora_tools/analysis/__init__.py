"""Stage 5, analyse: singular-value spectra of a model's targets, and plots. `compare` lives in its own stage,
`ailora_tools.comparison` (it runs the pipeline); it stays importable from here."""
from .. import lazy_exports

#: "compare": relative to this package, so ".comparison.runner" is the sibling stage's `ailora_tools.comparison.runner`
_EXPORTS = {"spectrum": "spectra", "compare": ".comparison.runner"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
