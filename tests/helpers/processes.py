"""Commands run in other processes: killed by SIGKILL after their first finished piece, or launched by torchrun."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

#: the command line in a process of its own: CLI + its arguments
CLI = [sys.executable, "-m", "ailora_tools.cli"]
KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from ailora_tools.io import output
from ailora_tools.cli import main
done = output.OutputDir.mark_done
def mark_done(self, piece, record):
    done(self, piece, record)
    os.kill(os.getpid(), signal.SIGKILL)
output.OutputDir.mark_done = mark_done
sys.argv[0] = "ailora-tools"
main()
"""


def run_killed(*args):
    return subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_SHARD, *map(str, args)], capture_output=True, text=True
    )


def tree_hashes(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


# BLAS and LAPACK results depend on the thread count, and torchrun gives each process one thread by default
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "ailora_tools.cli",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )
