"""Stage 5, analyse: singular-value spectra of a model's targets, and plots."""

from .. import lazy_exports

_EXPORTS = {"spectrum": "spectra"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
