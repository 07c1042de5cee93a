"""PiSSA (arXiv 2404.02948): every target starts from its principal singular components."""
from .targets import PRINCIPAL
from .method import InitMethod


class PiSSA(InitMethod):
    name = "pissa"
    summary = "all targets principal"

    def role_of(self, target, name, arch):
        return PRINCIPAL
