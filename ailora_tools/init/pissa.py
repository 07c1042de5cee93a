"""PiSSA (arXiv 2404.02948): every target starts from its principal singular components."""

from .method import InitMethod
from .targets import PRINCIPAL


class PiSSA(InitMethod):
    name = "pissa"
    summary = "all targets principal"

    def role_of(self, module, arch):
        return PRINCIPAL
