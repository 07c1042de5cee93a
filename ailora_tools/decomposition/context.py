"""What every step of one decompose run shares, planned before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..init import InitMethod, Job, Settings
from ..io.checkpoint import Checkpoint


@dataclass(frozen=True)
class DecomposeRun:
    """One decompose run's context: the checkpoint, its planned jobs (file order) and how their factors are computed.

    `context` is what the init method's `prepare` returned (LoRA-DA's calibrated factors); `device` the device flag
    as given ("auto" is resolved once torch has loaded)."""

    ckpt: Checkpoint
    jobs: tuple[Job, ...]
    init: InitMethod
    params: Settings
    context: Any
    device: str
    progress: bool
