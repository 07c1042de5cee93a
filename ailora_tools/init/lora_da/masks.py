"""transformers' attention-mask functions, which calibration calls as the models' own forward does, and the
transformers release they need."""

from __future__ import annotations

import inspect

import transformers

from ...errors import UnsupportedError

try:  # transformers.masking_utils exists since 4.53; the call below needs 5.4 (see `require_transformers`)
    from transformers.masking_utils import (
        create_bidirectional_mask,
        create_causal_mask,
        create_sliding_window_causal_mask,
    )
except ImportError:
    create_causal_mask = create_sliding_window_causal_mask = create_bidirectional_mask = None

#: the first transformers release whose mask functions take `inputs_embeds=` without a `cache_position`
TRANSFORMERS_NEEDED = "5.4"


def require_transformers() -> None:
    """Check that transformers' mask functions take what `decoder.DecoderParts.layer_kwargs` passes:
    `inputs_embeds=` and no `cache_position` (required before 5.4; transformers.masking_utils itself is new in 4.53).

    Raises:
        UnsupportedError: an older transformers, naming the installed and the required version.
    """
    if create_causal_mask is None or not all(
        map(_takes_our_call, (create_causal_mask, create_sliding_window_causal_mask))
    ):
        raise UnsupportedError(
            f"LoRA-DA calibration needs transformers >= {TRANSFORMERS_NEEDED} (its masking API); "
            f"transformers {transformers.__version__} is installed: run `pip install -U "
            f"'transformers>={TRANSFORMERS_NEEDED}'`, or use another --method"
        )


def _takes_our_call(mask_function) -> bool:
    params = inspect.signature(mask_function).parameters
    cache = params.get("cache_position")
    return "inputs_embeds" in params and (cache is None or cache.default is not inspect.Parameter.empty)


def no_cache(make) -> dict:
    """No KV cache, as this transformers' mask function spells it (`cache`; `past_key_values` before 5.x, deprecated
    since: passing it warns on every layer)."""
    return {"cache": None} if "cache" in inspect.signature(make).parameters else {"past_key_values": None}
