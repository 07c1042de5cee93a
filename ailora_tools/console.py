"""What the commands print besides their results: progress bars and the libraries' own chatter."""
from __future__ import annotations

import os
import sys
import warnings


def progress_enabled(quiet: bool) -> bool:
    """Bars unless --quiet. When stderr is a file or a pipe, bars refresh at most every 30 s, so a long run
    leaves a few lines in a log instead of thousands of carriage-return updates (tqdm reads TQDM_MININTERVAL)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    return not quiet


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's loading bars, info logs and deprecation warnings."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
