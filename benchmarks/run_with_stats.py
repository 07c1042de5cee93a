"""Run the ailora-tools CLI and record the process's peak GPU memory in $BENCH_STATS (JSON)."""
import json
import os
import sys

from ailora_tools.cli import main

try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    if os.environ.get("BENCH_STATS"):
        import torch

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        with open(os.environ["BENCH_STATS"], "w") as f:
            json.dump({"gpu_peak_bytes": peak}, f)
