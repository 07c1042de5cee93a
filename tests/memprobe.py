"""Subprocess helper for the peak-memory test: decompose and report RSS growth.

Usage: python memprobe.py MODEL OUT [decompose options as JSON]
Prints JSON {"baseline": bytes, "peak": bytes}: VmRSS just before decompose and VmHWM after it.
(VmHWM, not ru_maxrss: the latter also counts the parent's RSS at fork time, before exec.)
"""
import json
import sys

import torch  # noqa: F401  (imported before the baseline, as any caller would have)

from ailora_tools import decompose


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


if __name__ == "__main__":
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    baseline = status("VmRSS")
    decompose(sys.argv[1], sys.argv[2], progress=False, **options)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
