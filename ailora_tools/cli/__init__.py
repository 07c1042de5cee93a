"""The `ailora-tools` command line: each command builds its option dataclass (`ailora_tools.options`) from its
flags, calls the library, prints. Importing it changes nothing outside it. `run`, the console entry point (also
`python -m ailora_tools.cli`, `torchrun -m ailora_tools.cli`), first sets what a command process needs, then loads
the commands (`main`, imported on first use: tqdm must not load before `console.logged_bars` has paced it)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .. import lazy_exports
from ..console import logged_bars, no_hub_kernels, one_line_warnings

__all__ = ["main", "run", "exit_now"]
__getattr__, __dir__ = lazy_exports(__name__, {"main": "commands"}, ("run", "exit_now"))


def exit_now(code: int) -> NoReturn:
    """Exit without interpreter teardown: torch's alone takes about 0.3 s, and every file is closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The `ailora-tools` console entry point: the process-wide set-up (bars paced for logs, our warnings on one
    line, no Hub kernels: `console`), before anything imports tqdm, transformers or bitsandbytes; then `main`, then
    `exit_now` with its exit code."""
    logged_bars()
    one_line_warnings()
    no_hub_kernels()
    try:
        __getattr__("main")()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            exit_now(e.code or 0)
        raise
