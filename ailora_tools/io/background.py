"""Worker threads for the I/O side of a run (copying and hashing) that yield the CPU to the SVDs.

On Linux each worker lowers its own scheduling priority (nice +10), so on a machine with few cores the
copy and hash threads fill the gaps the SVD threads leave instead of preempting them: on the 1.1B
benchmark with 2 cores, decompose took 3.5 s instead of 3.9 s, and 5.3 s instead of 5.6 s with exact
SVDs. Elsewhere (where a thread cannot be reniced alone) the workers run at normal priority. Threads a
worker starts (BLAKE3's) inherit its priority.

How much I/O runs in parallel scales with the cores this process may use: `IO_THREADS`, one per 4 cores
(at most 8; 1 up to 7 cores, as on the 2-core machine the figures were measured on), is both the number
of copy workers and the number of threads that hash one large segment. `AILORA_IO_THREADS=N` (a positive
integer) overrides it.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

NICE = 10
#: cores this process may run on (its CPU affinity where the OS has one)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def io_threads(cores: int = CORES) -> int:
    """I/O threads for `cores` usable cores: AILORA_IO_THREADS when set to a positive number, else one per 4 cores
    (1 to 8)."""
    value = os.environ.get("AILORA_IO_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, min(8, cores // 4))


#: copy workers, and BLAKE3 threads per large segment
IO_THREADS = io_threads()


def io_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at lower priority than the thread that computes."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_lower_priority)


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # there, PRIO_PROCESS with a thread id renices that thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
