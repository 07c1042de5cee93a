"""Initial factors without a residual (plain LoRA, `no_residual`, `no_offset`), and the share of a torchrun worker.

W is read only when the method looks at it, by its byte range; no shard is copied, so the cost is the SVDs, whatever
the checkpoint's size. torch loads with the first computation (`devices`, `residual`)."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..distributed import Sharing, work
from ..init import Job
from ..io.fingerprints import stored_sample
from ..io.tensorio import read_tensor
from .context import DecomposeRun


def factors_only(run: DecomposeRun) -> tuple[dict, str]:
    """(module -> ((A0, B0), stats), the device used) for every job."""
    from ..devices import resolve_device

    dev = resolve_device(run.device)
    sharing = Sharing.start({j.module: work(j.shape) for j in run.jobs})
    results = {}
    for job in tqdm(run.jobs, desc="decompose", unit="matrix", disable=not run.progress):
        A0, B0, stats = sharing.result(job.module, lambda job=job: factors_of(run, job, dev))
        results[job.module] = ((A0, B0), {**stats, "source_sample": stored_sample(run.ckpt, job.tensor.name)})
    return results, str(dev)


def factors_of(run: DecomposeRun, job: Job, dev):
    """(A0, B0, stats) of one job, reading W from the checkpoint only when the method looks at it."""
    from .residual import initial_factors, working_copy

    if not run.init.needs_weights:  # the draw stays on the CPU, whatever the device
        return initial_factors(job, None, run.init, run.params, context=run.context, device="cpu")
    W = read_tensor(run.ckpt.shard(job.tensor.file), job.tensor.name)
    return initial_factors(job, working_copy(job, W, dev), run.init, run.params, context=run.context, device=dev)


def serve(run: DecomposeRun) -> int:
    """Ranks ≥ 1 of a torchrun launch: compute the factors of this rank's share of rank 0's jobs; return how many."""
    from ..devices import resolve_device

    dev, by_module = resolve_device(run.device), {j.module: j for j in run.jobs}
    return Sharing.start(None).serve(lambda name: factors_of(run, by_module[name], dev))
