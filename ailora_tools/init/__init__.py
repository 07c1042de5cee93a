"""Initialisation methods as plug-ins: one file per method, registered here by name.

Adding a method: a subclass of `InitMethod` in its own file, plus one line in `METHODS`.
"""

from __future__ import annotations

from ..errors import OptionError
from .ailora import AILoRA
from .corda import CorDA
from .eva import EVA
from .lora import LoRA
from .lora_da.method import LoRADA
from .lora_ga import LoRAGA
from .method import (
    InitMethod,
    Job,
    Settings,
    factors_from_triplets,
    lora_scale,
    svd_factors,
)
from .mica import MiCA
from .milora import MiLoRA
from .olora import OLoRA
from .orthogonal import Orthogonal
from .pissa import PiSSA

METHODS: dict[str, InitMethod] = {m.name: m for m in (AILoRA(), PiSSA(), MiLoRA(), LoRA(), LoRADA())}
METHODS.update({m.name: m for m in (OLoRA(), MiCA(), Orthogonal())})  # PEFT's data-free inits
METHODS.update({m.name: m for m in (CorDA(), LoRAGA(), EVA())})  # PEFT's data-aware inits, on LoRA-DA's calibration


def get_method(name: str) -> InitMethod:
    """The registered method called `name`.

    Raises:
        OptionError: no such method, listing the registered ones.
    """
    if name not in METHODS:
        raise OptionError(f"{{method}} {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "get_method",
    "InitMethod",
    "Job",
    "Settings",
    "lora_scale",
    "svd_factors",
    "factors_from_triplets",
]
