"""Share a rewrite's compute between processes launched by torchrun: each rank computes its share, rank 0 writes.

`torchrun --nproc-per-node N -m ailora_tools.cli decompose ...` (or `merge`) starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set; every one validates its input and plans the same jobs (the plan is
deterministic), so bad input stops every rank with the same message before anything is written. Rank 0 opens
the output, decides what `--resume` reuses, and broadcasts the tensors still to compute, in the order it will
write them; the i-th belongs to rank i mod N. Each other rank reads its tensors from the checkpoint (a shared
filesystem across nodes), computes them on its own device (`cuda:LOCAL_RANK` for auto/cuda) and sends each result
to rank 0, which writes it where its own computation would have gone. Results travel pickled over gloo (TCP,
between nodes too); a rank holds at most two results rank 0 has not taken. With the same kind of device on
every rank the output is byte-identical to a single-process run: every random draw is seeded by (seed, module).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, TypeVar

from .errors import AiloraError

T = TypeVar("T")
#: how long one rank waits for another: rank 0 may copy for a long time before it takes a rank's first result
TIMEOUT = timedelta(hours=12)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (read from the environment; no torch import)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_worker() -> bool:
    """Whether this process computes for rank 0 instead of writing (rank ≥ 1 of a torchrun launch)."""
    return launched() and int(os.environ.get("RANK", "0")) > 0


def use_local_gpu(device: str) -> None:
    """Make "auto" and "cuda" mean this rank's GPU, cuda:LOCAL_RANK (modulo the GPUs present), so that manifests
    name the device as a single process would."""
    if not launched() or device not in ("auto", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


class RankError(AiloraError):
    """Another rank failed while computing its share."""


@dataclass
class _Failed:
    rank: int
    message: str


@dataclass
class Sharing:
    """The tensors one run shares out, and who computes which. Build it with `Sharing.start` on every rank."""

    rank: int
    world: int
    owners: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, names: list[str] | None) -> "Sharing":
        """Join the process group; rank 0 passes the tensors to share, in the order it will ask for them, and
        every rank gets them. Not launched by torchrun: one rank that computes everything."""
        if not launched():
            return cls(0, 1)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        box = [names]
        dist.broadcast_object_list(box, src=0)
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, {n: i % world for i, n in enumerate(box[0] or [])})

    def result(self, name: str, local: Callable[[], T]) -> T:
        """Rank 0: `local()` for its own tensors and those not shared, else the owner's result (in order).

        Raises:
            RankError: the owner failed computing it.
        """
        owner = self.owners.get(name, 0)
        if owner == 0:
            return local()
        import torch.distributed as dist

        box = [None]
        dist.recv_object_list(box, src=owner)
        if isinstance(box[0], _Failed):
            raise RankError(f"rank {box[0].rank}: {box[0].message}")
        return box[0]

    def serve(self, compute: Callable[[str], object]) -> int:
        """Ranks ≥ 1: compute this rank's tensors in order and send each to rank 0 (the next is computed while
        one is sent); return how many. A failure is sent to rank 0, which reports it and exits; then it is raised."""
        import torch.distributed as dist

        mine = [n for n, r in self.owners.items() if r == self.rank]
        sender, sending = ThreadPoolExecutor(1, thread_name_prefix="send"), None

        def send(obj) -> Future:
            return sender.submit(dist.send_object_list, [obj], 0)

        try:
            for name in mine:
                try:
                    value = compute(name)
                except Exception as e:
                    if sending is not None:
                        sending.result()
                    send(_Failed(self.rank, f"{name}: {e}" if not isinstance(e, AiloraError) else str(e))).result()
                    _until_rank0_exits()  # rank 0 reports the error; torchrun stops the others once it has
                    raise
                if sending is not None:
                    sending.result()
                sending = send(value)
            if sending is not None:
                sending.result()
        finally:
            sender.shutdown(wait=True)
        return len(mine)


def _until_rank0_exits() -> None:
    """Wait for rank 0 to end (it never sends to this rank: the receive ends when its connection closes)."""
    import torch.distributed as dist

    try:
        dist.recv_object_list([None], src=0)
    except Exception:  # the connection closed: rank 0 has reported and exited
        pass
