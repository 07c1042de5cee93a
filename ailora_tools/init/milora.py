"""MiLoRA (arXiv 2406.09044): every target starts from its minor singular components."""

from .method import InitMethod
from .targets import MINOR


class MiLoRA(InitMethod):
    name = "milora"
    summary = "all targets minor"

    def role_of(self, module, arch):
        return MINOR
