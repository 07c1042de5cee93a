"""Worker threads for the I/O side of a run (copying and hashing) that yield the CPU to the SVDs.

On Linux each worker lowers its own scheduling priority (nice +10), so on a machine with few cores the
copy and hash threads fill the gaps the SVD threads leave instead of preempting them: on the 1.1B
benchmark with 2 cores, decompose took 3.5 s instead of 3.9 s, and 5.3 s instead of 5.6 s with exact
SVDs. Elsewhere (where a thread cannot be reniced alone) the workers run at normal priority.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

NICE = 10


def io_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at lower priority than the thread that computes."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_lower_priority)


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # there, PRIO_PROCESS with a thread id renices that thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
