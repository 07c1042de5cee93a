"""`python -m ailora_tools.cli` (and `torchrun -m ailora_tools.cli`): the console entry point."""

from . import run

run()
