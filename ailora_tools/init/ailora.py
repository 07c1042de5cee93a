"""AILoRA (arXiv 2510.08034): query projections start principal, value projections minor.

Any other target needs a role from --role; fused QKV matrices cannot take two roles (targets.assign_roles).
"""
from .method import InitMethod
from .targets import MINOR, PRINCIPAL


class AILoRA(InitMethod):
    name = "ailora"
    summary = "query principal, value minor (any other target needs --role)"

    def role_of(self, target, name, arch):
        if target in arch.query or name in arch.query or target == "q_proj":
            return PRINCIPAL
        if target in arch.value or name in arch.value or target == "v_proj":
            return MINOR
        return None
