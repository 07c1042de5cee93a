"""Subprocess helper for the peak-memory test: decompose and report RSS growth.

Usage: python -m ailora_tools.testing.memprobe MODEL OUT [decompose options as JSON]
Prints JSON {"baseline", "peak", "device", "fixed"} (bytes): VmRSS just before decompose and VmHWM after it.
(VmHWM, not ru_maxrss: the latter also counts the parent's RSS at fork time, before exec.)

When decompose will run on CUDA, the CUDA context and the kernels it loads (cuBLAS, cuSOLVER) are a fixed
host cost, not part of the stated bound: a first decompose of the same model into a scratch directory loads
them, freed heap goes back to the system (malloc_trim), the peak is reset (/proc/self/clear_refs), the digest
cache is emptied so that the measured run hashes everything again, and "fixed" reports what that warm-up
left in the resident set.
"""

import ctypes
import json
import sys
import tempfile

import torch  # noqa: F401  (imported before the baseline, as any caller would have)

from ailora_tools import decompose
from ailora_tools.devices import resolve_device
from ailora_tools.io import hashing


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def settle() -> None:
    """After a warm-up: freed heap goes back to the system (glibc malloc_trim), so that it cannot hide the measured
    run's growth, and the peak is reset to the current RSS (VmHWM := VmRSS, Linux ≥ 4.0)."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


if __name__ == "__main__":
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    device = resolve_device(options.get("device", "auto"))
    start = status("VmRSS")
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as scratch:
            decompose(sys.argv[1], scratch + "/warm", progress=False, **options)
        hashing.forget_digests()
        settle()
    baseline = status("VmRSS")
    decompose(sys.argv[1], sys.argv[2], progress=False, **options)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "device": str(device), "fixed": baseline - start}))
