"""Run the ailora-tools CLI as its console script does and record the peak GPU memory in $BENCH_STATS (JSON)."""

import json
import os
import sys

from ailora_tools.cli import exit_now, main

code = 0
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
finally:
    if os.environ.get("BENCH_STATS"):
        import torch

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        with open(os.environ["BENCH_STATS"], "w") as f:
            json.dump({"gpu_peak_bytes": peak}, f)
exit_now(code)
