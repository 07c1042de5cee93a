"""LoRA-DA (arXiv 2510.24561): the init method (`method`), its calibration at bounded memory (`calibration`, which
runs `parts`/`decoder`/`encoder`, `batches`, `runner`, `spill` and `statistics`; docs/lora-da-calibration.md) and
the factor maths (`maths`)."""

from ... import lazy_exports

_EXPORTS = {"LoRADA": "method", "calibrate": "calibration", "factor_input": "maths", "lora_da_factors": "maths"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
