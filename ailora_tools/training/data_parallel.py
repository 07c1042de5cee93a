"""Training on N processes started by torchrun (data parallel): each rank takes its rows of every micro-batch.

What defines a run does not depend on N: the data order, `--batch-size` (examples per micro-batch, all ranks
together), `--grad-accum` and so the steps and the learning-rate schedule. Every rank builds the same micro-batch
and computes the loss over its contiguous slice of the rows (`torch.tensor_split`), weighted by its share of the
batch's loss terms (tokens with a label, or examples), so that the shares sum, over the ranks, to the loss one
process computes; the gradients are summed across ranks (one all-reduce per optimizer step, of the trainable
tensors only: an adapter's are small) and every rank takes the same AdamW step. So N ranks compute what one
process computes, up to float rounding, and `--resume` continues a run on any N. A rank left without rows (a
micro-batch of fewer rows than ranks) runs one row with weight 0, so that every rank joins every step.

Rank 0 alone evaluates and writes (metrics, checkpoints, the output); the others wait for it at the next
step. Dropout: rank 0 draws from the one-process random stream (what checkpoints save); ranks ≥ 1 from their own,
seeded by (seed, rank, the step they start at); with dropout, N ranks and one process are therefore equal in
distribution, not bit for bit. Backends: gloo on CPUs, NCCL for CUDA tensors (gloo still carries objects).

`--fsdp` shards the model itself (torch's FSDP2, `fully_shard`): the ranks read the base in turn, each keeping
1/N of every weight on its device before the next reads (one whole copy in host memory at a time), and FSDP
sums the gradients instead of `sum_gradients`; the rows, shares and steps are the same. The whole of a trained
tensor is then on no rank: every rank evaluates, and takes part in gathering what rank 0 writes
(`distributed.full_tensor`); a checkpoint is read by every rank, each keeping its shard (`shard_like`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..distributed import TIMEOUT, launched


@dataclass
class Ranks:
    """This process's place in the run: `rank` of `world`. Build it with `Ranks.start` on every rank."""

    rank: int = 0
    world: int = 1
    mesh: object = None  # --fsdp: the ranks' DeviceMesh

    @classmethod
    def start(cls, device: torch.device, *, fsdp: bool = False) -> Ranks:
        """Join the process group (not launched by torchrun: one rank, no group); `fsdp`: also make the mesh."""
        if not launched():
            return cls()
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group(
                "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                timeout=TIMEOUT,
                device_id=device if device.type == "cuda" else None,
            )
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, init_device_mesh(device.type, (world,)) if fsdp else None)

    @contextmanager
    def in_turn(self, enabled: bool):
        """With `enabled`, the ranks run the block one after the other, rank 0 first (each waits for the one before)."""
        if not enabled or self.world == 1:
            yield
            return
        import torch.distributed as dist

        for _ in range(self.rank):
            dist.barrier()
        yield
        for _ in range(self.world - self.rank):
            dist.barrier()

    @property
    def writes(self) -> bool:
        """Whether this rank writes (rank 0)."""
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor], weight: int, loss_weight) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's rows of a micro-batch and the factor on their mean loss: their share of the batch's `weight`
        loss terms (`loss_weight(labels)` counts a slice's). One process: the whole batch, factor 1."""
        if self.world == 1:
            return batch, 1.0
        rows = torch.tensor_split(torch.arange(len(batch["labels"])), self.world)[self.rank]
        if len(rows) == 0:  # fewer rows than ranks: join the step with no weight
            return {k: v[:1] for k, v in batch.items()}, 0.0
        part = {k: v[rows] for k, v in batch.items()}
        return part, loss_weight(part["labels"]) / max(weight, 1)

    def shard_model(self, model: torch.nn.Module) -> None:
        """`--fsdp`: shard `model` across the ranks with FSDP2, one unit per transformer block and one for the rest,
        each rank's shards moved to its device (no communication). FSDP averages the gradients over the ranks, so
        the loop weights each rank's loss by N times its share."""
        from torch.distributed.fsdp import fully_shard
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                fully_shard(module, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)

    def sum_gradients(self, params: list[torch.nn.Parameter], *numbers: float) -> list[float]:
        """Sum the gradients of `params` and the `numbers` over the ranks (in place); return the summed numbers. A
        gradient no rank has stays None (AdamW skips it, as in one process)."""
        if self.world == 1:
            return list(numbers)
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else None
        device = flat.device if flat is not None else torch.device("cpu")
        counts = torch.tensor([*numbers, *(p.grad is not None for p in params)], dtype=torch.float64, device=device)
        if flat is not None:
            dist.all_reduce(flat)
        dist.all_reduce(counts)
        at = 0
        for p, present in zip(params, counts[len(numbers) :].tolist()):
            p.grad = flat[at : at + p.numel()].view_as(p) if present else None
            at += p.numel()
        return counts[: len(numbers)].tolist()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a picklable object)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def fork_rng(self, seed: int, step: int) -> None:
        """Ranks ≥ 1: a random stream of their own for dropout (rank 0 keeps the one-process stream)."""
        if self.rank:
            torch.manual_seed((seed * 1_000_003 + step) * 1_009 + self.rank)

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
