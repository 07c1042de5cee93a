"""OUT/residual: the checkpoint rewritten with each target's residual W − s·B0·A0 in its byte range (`io.rewrite`),
quantised to NF4 with `--quantize`; the initial factors come back with it.

torch loads when the first target is computed (`residual`, `devices`): by then the first shards are being copied and
hashed, so the import overlaps with I/O. Launched by torchrun, rank 0 takes each target's factors from the rank that
computed them (`distributed`) and computes the residuals."""

from __future__ import annotations

import json
from functools import partial

from ..distributed import Sharing, work
from ..init import Job
from ..init.targets import linear_modules
from ..io.checkpoint import Checkpoint
from ..io.fingerprints import sample
from ..io.nf4_layout import parts_layout, quantization_config, skip_modules
from ..io.output import OutputDir
from ..io.rewrite import Hashes, Replaced, by_shard, pending, rewrite_checkpoint
from ..io.tensorio import DTYPES, TensorInfo, tensor_bytes
from ..manifests import RESIDUAL_DIR
from ..quantization.nf4 import quantize
from .context import DecomposeRun


def write_residual(
    run: DecomposeRun, od: OutputDir, hashes: Hashes, out_dtype: str | None, quant: dict | None
) -> tuple[dict, str]:
    """Rewrite the checkpoint into `od`/residual with residual targets (quantised with `quant`, as `decompose` plans
    it); return module -> ((A0, B0), stats) and the device used."""
    ckpt, by_tensor = run.ckpt, {}
    for j in run.jobs:  # a tensor holds one target, or (GPT-OSS) every expert's slice of a fused parameter
        by_tensor.setdefault(j.tensor.name, []).append(j)
    replaced = [*by_tensor, *(quant["only"] if quant else [])]
    plan = by_shard(ckpt.tensors, replaced)
    parts = {name: _layout(ckpt.tensors[name], out_dtype, quant) for name in replaced} if quant else {}
    files = _quant_files(ckpt, set(parts), out_dtype, quant["double_quant"]) if quant else {}
    sharing = Sharing.start(
        {j.module: work(j.shape) for n in pending(ckpt, od, RESIDUAL_DIR, plan) for j in by_tensor.get(n, [])}
    )
    compute = _Residuals(run, by_tensor, sharing, out_dtype, quant)
    done = rewrite_checkpoint(
        ckpt,
        od,
        RESIDUAL_DIR,
        plan,
        compute,
        hashes=hashes,
        out_dtype=out_dtype,
        progress=run.progress,
        desc="decompose",
        parts=parts,
        files=files,
    )
    results = {
        m: ((extras[f"{m}::A"], extras[f"{m}::B"]), stats)
        for extras, record in done.values()
        for m, stats in record.items()
    }
    return results, compute.device_used()


class _Residuals:
    """`rewrite_checkpoint`'s compute for decompose: a tensor's targets' factors (computed here, or by the rank that
    had them) and their residuals, each built in the working copy its factors came from when this rank computed
    them. Extras and records are by module (`{module}::A`, `{module}::B`; module -> stats)."""

    def __init__(
        self,
        run: DecomposeRun,
        by_tensor: dict[str, list[Job]],
        sharing: Sharing,
        out_dtype: str | None,
        quant: dict | None,
    ):
        self.run, self.by_tensor, self.sharing, self.out_dtype, self.quant = run, by_tensor, sharing, out_dtype, quant
        self.ran_on = None  # the device, resolved once torch has loaded ("auto")
        self._held = None  # the working copy of the target this rank computed the factors of

    def __call__(self, info: TensorInfo, W) -> Replaced:
        from ..devices import resolve_device

        if self.ran_on is None:
            self.ran_on = resolve_device(self.run.device)
        if info.name not in self.by_tensor:  # --quantize-all: a weight without factors
            return _split(info.name, quantize(W, dtype=self.out_dtype or info.dtype), {})
        jobs = self.by_tensor[info.name]
        if jobs[0].part is not None:
            return self._slices(jobs, W)
        job = jobs[0]
        A0, B0, stats, Wc = self._factors(job, W)
        if self.quant:
            return self._quantized(job, info, W, Wc, A0, B0, stats)
        from .residual import residual_of

        stored, recon = residual_of(job, Wc, A0, B0, self.run.params.scale, out_dtype=self.out_dtype)
        stored = stored.cpu().contiguous()
        return _replaced(W, stored, {job.module: (A0, B0, {**stats, **recon})})

    def _slices(self, jobs: list[Job], W) -> Replaced:
        """A stored fused parameter (GPT-OSS experts) with every expert slice's residual written into a copy of it."""
        from ..io.tensorio import torch_dtype
        from .residual import residual_of

        out, found = W.to(torch_dtype(self.out_dtype or jobs[0].tensor.dtype), copy=True), {}
        for job in jobs:
            A0, B0, stats, Wc = self._factors(job, W)
            stored, recon = residual_of(job, Wc, A0, B0, self.run.params.scale, out_dtype=self.out_dtype)
            job.matrix(out).copy_(stored.cpu())
            found[job.module] = (A0, B0, {**stats, **recon})
        return _replaced(W, out.contiguous(), found)

    def _factors(self, job: Job, W):
        """(A0, B0, stats, the working copy of W to build the residual in), the factors computed here or received."""
        from .residual import working_copy

        A0, B0, stats = self.sharing.result(job.module, partial(self._own, job, W))  # or from the rank that did them
        Wc, self._held = (self._held if self._held is not None else working_copy(job, W, self.ran_on)), None
        return A0, B0, stats, Wc

    def _own(self, job: Job, W):
        """This rank's job: the factors from the working copy the residual is then built in."""
        from .residual import initial_factors, working_copy

        self._held = working_copy(job, W, self.ran_on)
        return initial_factors(
            job, self._held, self.run.init, self.run.params, context=self.run.context, device=self.ran_on
        )

    def _quantized(self, job: Job, info: TensorInfo, W, Wc, A0, B0, stats: dict) -> Replaced:
        from .quantized import quantized_residual, refits

        q, A0, B0, qstats = quantized_residual(
            job,
            Wc,
            A0,
            B0,
            self.run.params,
            dtype=self.out_dtype or info.dtype,
            iters=self.quant["loftq_iters"],
            refit=refits(job, self.run.init),
            double_quant=self.quant["double_quant"],
        )
        samples = {"source_sample": sample(tensor_bytes(W)), "residual_sample": sample(tensor_bytes(q[""]))}
        return _split(
            info.name, q, {job.module: {**stats, **qstats, **samples}}, {f"{job.module}::A": A0, f"{job.module}::B": B0}
        )

    def device_used(self) -> str:
        from ..devices import resolve_device

        return str(self.ran_on if self.ran_on is not None else resolve_device(self.run.device))


def _replaced(W, stored, found: dict) -> Replaced:
    """What the rewrite engine stores for a tensor: its residual `stored`, and each of its modules' factors and
    stats (`found`: module -> (A0, B0, stats)) with the fingerprints of the source and residual tensors."""
    samples = {"source_sample": sample(tensor_bytes(W)), "residual_sample": sample(tensor_bytes(stored))}
    extras = {f"{m}::{k}": f for m, (A0, B0, _) in found.items() for k, f in (("A", A0), ("B", B0))}
    return Replaced(stored, extras, {m: {**stats, **samples} for m, (_, _, stats) in found.items()})


def _layout(t: TensorInfo, out_dtype: str | None, quant: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a quantised weight is stored as, by output name, with their dtypes and shapes."""
    layout = parts_layout(t.shape, out_dtype or t.dtype, double_quant=quant["double_quant"])
    return {f"{t.name}.{k}" if k else t.name: v for k, v in layout.items()}


def _split(name: str, parts: dict, record: dict, extras: dict | None = None) -> Replaced:
    """A quantised weight as the rewrite engine writes it: the packed weight in `name`'s place, its parts beside."""
    return Replaced(parts[""], extras or {}, record, parts={f"{name}.{k}": v for k, v in parts.items() if k})


def _quant_files(ckpt: Checkpoint, quantized: set[str], out_dtype: str | None, double_quant: bool) -> dict[str, bytes]:
    """config.json with the `quantization_config` transformers loads the quantised residual by."""
    linear = linear_modules(ckpt.tensors)
    names = {m for m, t in linear.items() if t.name in quantized}
    dtypes = {linear[m].dtype for m in names}
    compute = DTYPES[out_dtype or (dtypes.pop() if len(dtypes) == 1 else "F32")][0]
    config = {
        **ckpt.config,
        "quantization_config": quantization_config(
            compute_dtype=compute, skip=skip_modules(linear, names), double_quant=double_quant
        ),
    }
    return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
