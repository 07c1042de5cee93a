"""Device names as the commands take them (`--device auto|cpu|cuda|cuda:N`), resolved once."""

from __future__ import annotations

import torch

from .errors import UnsupportedError


def resolve_device(device: str) -> torch.device:
    """'auto' means the first CUDA device when there is one, else the CPU.

    Raises:
        UnsupportedError: not a device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UnsupportedError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(
            f"--device {device!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UnsupportedError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 up to the last one, or auto"
        )
    return dev
