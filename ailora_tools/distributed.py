"""Share out the SVDs of a run between the processes torchrun starts: each rank computes its share, rank 0 writes.

`torchrun --nproc-per-node N -m ailora_tools.cli decompose ...` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE set; every one validates its input and plans the same jobs (the plan is deterministic), so bad input
stops every rank with the same message before anything is written. Rank 0 opens the output, decides what
`--resume` reuses, and hands out the matrices still to compute in the order it will write them, each to the
rank with the least work so far (`work`: m·n·min(m, n) for an m×n matrix). Each other rank reads its matrices
from the checkpoint (a shared filesystem across nodes), computes their factors on its own device
(`cuda:LOCAL_RANK` for auto/cuda), and sends them to rank 0 as they are done; rank 0 computes the residuals
(one rank-r product each) and writes. Results are small (the factors and their stats, r·(m + n) floats) and
travel pickled over gloo (TCP, between nodes too). With the same kind of device and thread count on every
rank the output is byte-identical to one process's: every random draw is seeded by (seed, module).

`full_tensor` and `shard_like` move tensors between the whole and the shards `train --fsdp` keeps on each rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from .errors import AiloraError, RankError

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
    def start(cls, work: dict[str, float] | None) -> Sharing:
        """Join the process group and agree on who computes what. Rank 0 passes the work of each tensor to share,
        in the order it will ask for them; the others pass None. Not launched by torchrun: one rank, no group."""
        if not launched():
            return cls(0, 1)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        world = dist.get_world_size()
        box = [None if work is None else assign(work, world)]
        dist.broadcast_object_list(box, src=0)
        return cls(dist.get_rank(), world, box[0])

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
        """Ranks ≥ 1: compute this rank's tensors in order, each sent to rank 0 while the next is computed; return
        how many. A failure is sent to rank 0, which reports it and exits; then it is raised here."""
        import torch.distributed as dist

        mine = [n for n, r in self.owners.items() if r == self.rank]
        sender = ThreadPoolExecutor(1, thread_name_prefix="send")
        sent: list[Future] = []
        try:
            for name in mine:
                try:
                    value = compute(name)
                except Exception as e:
                    for f in sent:
                        f.result()
                    message = str(e) if isinstance(e, AiloraError) else f"{name}: {e.__class__.__name__}: {e}"
                    sender.submit(dist.send_object_list, [_Failed(self.rank, message)], 0).result()
                    _until_rank0_exits()  # rank 0 reports the error; torchrun stops the others once it has
                    raise
                sent.append(sender.submit(dist.send_object_list, [value], 0))
            for f in sent:
                f.result()
        finally:
            sender.shutdown(wait=True)
        return len(mine)


def work(shape) -> float:
    """How much computing the factors of an m×n matrix takes, relatively: m·n·min(m, n) (an SVD)."""
    m, n = shape
    return float(m) * n * min(m, n)


def assign(work: dict[str, float], world: int) -> dict[str, int]:
    """Each tensor, in order, to the rank with the least work so far (ties: the highest rank, as rank 0 also writes).

    Example:
        >>> assign({"q0": 8, "v0": 1, "q1": 8, "v1": 1}, 2)
        {'q0': 1, 'v0': 0, 'q1': 0, 'v1': 1}
    """
    load = [0.0] * world
    owners = {}
    for name, w in work.items():
        owners[name] = min(reversed(range(world)), key=load.__getitem__)
        load[owners[name]] += w
    return owners


def full_tensor(t):
    """The whole of a tensor that `train --fsdp` shards across the ranks (a DTensor: every rank must call this, it
    gathers), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(param, value):
    """`value` (the whole tensor, on every rank) as `param` holds it: this rank's shard of it for a DTensor (no
    communication), else `value` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(
        value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )


def _until_rank0_exits() -> None:
    """Wait for rank 0 to end (it never sends to this rank: the receive ends when its connection closes)."""
    import torch.distributed as dist

    try:
        dist.recv_object_list([None], src=0)
    except Exception:  # the connection closed: rank 0 has reported and exited
        pass
