"""Make a 'trained' adapter for the merge/convert workloads: the initial one with seeded noise added.

Usage: python prepare_trained.py INITIAL_ADAPTER OUT
"""

import json
import sys
from pathlib import Path

import torch

from ailora_tools.io.peft_adapter import read_adapter, write_adapter

initial, out = Path(sys.argv[1]), Path(sys.argv[2])
adapter = read_adapter(initial)
g = torch.Generator().manual_seed(0)
write_adapter(
    out,
    adapter.config,
    {
        m: (A + 0.01 * torch.randn(A.shape, generator=g), B + 0.01 * torch.randn(B.shape, generator=g))
        for m, (A, B) in adapter.factors.items()
    },
)
(out / "ailora-train.json").write_text(json.dumps({"initial_adapter": str(initial.absolute())}))
