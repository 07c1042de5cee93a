"""AILoRA (arXiv 2510.08034): query projections start principal, value projections minor.

The paper names only Q and V. For the other modules the default follows the two attention circuits: K, which forms
the attention scores with Q (QKᵀ), starts principal like Q; the attention output O, which carries V's values (the OV
circuit), starts minor like V; every other module (MLP, pooler, ...) starts principal, PiSSA's choice, which
converges fastest when every linear layer is adapted. `--role NAME=principal|minor` overrides any of them.
A fused Q/K/V matrix (Phi-3 `qkv_proj`, GPT-2 `c_attn`, ...) gets both roles in one pair (`init.fused`).
"""

from .fused import fused_factors
from .method import InitMethod, svd_factors
from .targets import MINOR, PRINCIPAL, SPLIT, role_in_attention

#: attention matrix -> its default role (anything else: principal)
DEFAULT_ROLES = {"query": PRINCIPAL, "key": PRINCIPAL, "value": MINOR, "output": MINOR, "qkv": SPLIT}


class AILoRA(InitMethod):
    name = "ailora"
    summary = (
        "query principal, value minor; key principal, attention output minor, others principal (--role "
        "overrides); a fused QKV matrix gets both in one pair"
    )

    def role_of(self, module, arch):
        return DEFAULT_ROLES.get(role_in_attention(module, arch), PRINCIPAL)

    def factors(self, job, W, settings, *, context=None, generator=None):
        if job.role == SPLIT:
            return fused_factors(W, job.rows, settings, generator=generator)
        return svd_factors(W, job.role, settings, generator=generator)
