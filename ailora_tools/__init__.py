"""ailora-tools: AILoRA / PiSSA / MiLoRA initialisation, conversion and merging at real model sizes."""

__version__ = "0.1.0"

from .checkpoint import Checkpoint  # noqa: E402
from .convert import convert  # noqa: E402
from .decompose import decompose  # noqa: E402
from .errors import AiloraError  # noqa: E402
from .merge import merge  # noqa: E402

__all__ = ["AiloraError", "Checkpoint", "convert", "decompose", "merge", "__version__"]
