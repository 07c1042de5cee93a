"""Stage 5, analyse: singular-value spectra of a model's targets and side-by-side comparisons of init methods."""
from .. import lazy_exports

_EXPORTS = {"spectrum": "spectra", "compare": "comparison"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
