"""Stage 6, compare: run decompose + train for several init methods (× learning rates × seeds) on the same model and
data, then summarise, plot and report: `plan` checks everything first, `runner` executes, `summary`, `curves` and
`report` measure and write."""
from .. import lazy_exports

_EXPORTS = {"compare": "runner", "parse_lrs": "sweeps", "parse_seeds": "sweeps"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
