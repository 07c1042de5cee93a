"""What a piece of code holds at its peak, counted rather than read off the resident set: `HeldPeak`.

RSS moves with the allocator (glibc's mmap threshold adapts to the sizes freed, heap holes stay resident, arenas
multiply under thread contention), so two runs of the same code differ by megabytes on a loaded machine. Counted
instead: the live bytes of torch's CPU tensors (the allocation and free events of torch's profiler, replayed in order:
their running sum's maximum above the level at entry) and the Python heap (tracemalloc's peak, numpy's arrays
included). Both are what the code keeps, whatever the load; a tensor kept per layer shows in the first, a Python
structure kept per layer in the second. Tensors mapped from files (`torch.from_file`, safetensors' mmap) are not
allocations and are not counted.
"""

from __future__ import annotations

import tracemalloc

import torch
from torch.autograd import DeviceType

CPU = DeviceType.CPU


class HeldPeak:
    """Context manager: `tensors` (peak live CPU tensor bytes above the level at entry) and `python` (peak traced
    Python heap bytes) of the code run inside it. Run intra-op work on one thread (`torch.set_num_threads(1)`) so that
    every allocation is seen in the order it happens."""

    def __enter__(self) -> HeldPeak:
        tracemalloc.start()
        self._profile = torch.autograd.profiler.profile(profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        self.python = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        events = sorted(
            (e for e in self._profile.kineto_results.events() if e.name() == "[memory]" and e.device_type() == CPU),
            key=lambda e: e.start_ns(),
        )
        live = self.tensors = 0
        for e in events:
            live += e.nbytes()
            self.tensors = max(self.tensors, live)
        self.left = live  # tensor bytes still live at exit, above the level at entry
