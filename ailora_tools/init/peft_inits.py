"""What PEFT's `init_lora_weights` values say about the base an adapter saved with them applies to (peft 0.21).

PiSSA, OLoRA, CorDA and LoRA-GA rewrite each target weight as W − s·B0·A0, and LoftQ replaces it by its quantised
form: such an adapter applies to that rewritten base until it is converted (`convert --initial`). Gaussian, EVA,
orthogonal and MiCA leave the base as it is (B0 = 0, or B0·A0 = 0): the adapter already is a LoRA on the original,
and only the string needs rewriting to `true` for vLLM, which refuses the strings it does not know.
"""

from __future__ import annotations

#: init_lora_weights values (pissa also as pissa_niter_N) whose init rewrites the base
OFFSETS_BASE = ("pissa", "olora", "corda", "lora_ga", "loftq")
#: string values that leave the base as it is
KEEPS_BASE = ("gaussian", "eva", "orthogonal", "mica")


def applies_to_original(init_lora_weights) -> bool:
    """Whether an adapter saved with this `init_lora_weights` is a LoRA on the original model (True/False always;
    a string only when PEFT's init leaves the base as it is; an unknown string is taken to rewrite it)."""
    return not isinstance(init_lora_weights, str) or init_lora_weights.lower() in KEEPS_BASE
