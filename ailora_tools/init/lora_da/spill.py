"""Where calibration keeps layer inputs and gradients between passes: in RAM up to a budget, beyond it in files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


class SpillStore:
    """Tensors by key, on the CPU: in RAM up to `budget` bytes, beyond that in files of a temporary directory."""

    def __init__(self, budget: int, scratch: str | os.PathLike | None):
        self.budget, self.used, self.scratch = budget, 0, scratch
        self.ram: dict[tuple, torch.Tensor] = {}
        self.files: dict[tuple, tuple[Path, torch.Size, torch.dtype]] = {}
        self.dir: Path | None = None

    def put(self, key: tuple, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self.used + n <= self.budget:
            self.ram[key], self.used = t, self.used + n
            return
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=".ailora-calibration-", dir=self.scratch))
        path = self.dir / ("-".join(map(str, key)) + ".bin")
        t.reshape(-1).view(torch.uint8).numpy().tofile(path)
        self.files[key] = (path, t.shape, t.dtype)

    def get(self, key: tuple, *, remove: bool = False) -> torch.Tensor:
        if key in self.ram:
            t = self.ram.pop(key) if remove else self.ram[key]
            self.used -= t.numel() * t.element_size() if remove else 0
            return t
        path, shape, dtype = self.files.pop(key) if remove else self.files[key]
        t = torch.from_file(str(path), shared=False, size=shape.numel(), dtype=dtype).reshape(shape)
        if remove:
            path.unlink()
        return t

    def close(self) -> None:
        self.ram.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
