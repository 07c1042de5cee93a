"""What the commands print besides their results: progress bars and the libraries' own chatter."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .errors import AiloraWarning


def logged_bars() -> None:
    """When stderr is a file or a pipe, bars refresh at most every 30 s, so a long run leaves a few lines in a log
    instead of thousands of carriage-return updates. tqdm reads TQDM_MININTERVAL once, when it is imported: the
    command line calls this before anything imports tqdm."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


def progress_enabled(quiet: bool) -> bool:
    """Bars unless --quiet (see `logged_bars` for their pace in a log)."""
    logged_bars()
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


def one_line_warnings() -> None:
    """Print our own warnings (`errors.AiloraWarning`) as `warning: ...` on stderr, once each, without a source line."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AiloraWarning):
            print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


#: what bitsandbytes logs when `no_hub_kernels` has kept it from fetching its CPU kernel
_BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def no_hub_kernels() -> None:
    """No kernel code downloaded from the Hub in our commands, unless USE_HUB_KERNELS=YES says otherwise.
    transformers (5.x) kernelizes layers with Hub kernels at every from_pretrained unless USE_HUB_KERNELS is off;
    bitsandbytes, on import on CPUs with AVX512-BF16, asks the `kernels` package for a 4-bit matmul kernel from the
    Hub repo kernels-community/quantization-bitsandbytes, and transformers and PEFT import bitsandbytes in every
    command once it is installed: every command would reach for the network (and offline print a long warning).
    So USE_HUB_KERNELS defaults to NO, `kernels` counts as not installed (transformers takes it as absent too) and
    bitsandbytes' one warning about the missing kernel is dropped: it computes with its own CPU kernels. Any other
    bitsandbytes message still shows. Called once, before anything imports them."""
    if os.environ.setdefault("USE_HUB_KERNELS", "NO").upper() not in ("NO", "0", "FALSE", "OFF"):
        return
    sys.modules.setdefault("kernels", None)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(_BNB_KERNEL_WARNING)
    )
