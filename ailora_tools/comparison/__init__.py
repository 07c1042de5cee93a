"""Stage 6, compare: run decompose + train for several init methods (× learning rates × seeds) on the same model and
data, then summarise, plot and report: `plan` checks everything first, `costs` says how many runs and how long,
`runner` executes the runs `schedule` orders (with `--lr auto`, `search`'s), `summary`, `curves` and `statistics`
measure and test the differences, `report` writes."""

from .. import lazy_exports

_EXPORTS = {"compare": "runner", "parse_lrs": "sweeps", "parse_seeds": "sweeps"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
