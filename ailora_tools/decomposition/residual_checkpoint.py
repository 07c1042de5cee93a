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
    ckpt, by_tensor = run.ckpt, {j.tensor.name: j for j in run.jobs}
    replaced = [*by_tensor, *(quant["only"] if quant else [])]
    plan = by_shard(ckpt.tensors, replaced)
    parts = {name: _layout(ckpt.tensors[name], out_dtype, quant) for name in replaced} if quant else {}
    files = _quant_files(ckpt, set(parts), out_dtype, quant["double_quant"]) if quant else {}
    sharing = Sharing.start(
        {n: work(by_tensor[n].tensor.shape) for n in pending(ckpt, od, RESIDUAL_DIR, plan) if n in by_tensor}
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
        by_tensor[n].module: ((extras["A"], extras["B"]), record)
        for n, (extras, record) in done.items()
        if n in by_tensor
    }
    return results, compute.device_used()


class _Residuals:
    """`rewrite_checkpoint`'s compute for decompose: a target's factors (computed here, or by the rank that had them)
    and its residual, built in the working copy the factors came from when this rank computed them."""

    def __init__(
        self, run: DecomposeRun, by_tensor: dict[str, Job], sharing: Sharing, out_dtype: str | None, quant: dict | None
    ):
        self.run, self.by_tensor, self.sharing, self.out_dtype, self.quant = run, by_tensor, sharing, out_dtype, quant
        self.ran_on = None  # the device, resolved once torch has loaded ("auto")
        self._held = None  # the working copy of the target this rank computed the factors of

    def __call__(self, info: TensorInfo, W) -> Replaced:
        from ..devices import resolve_device
        from .residual import (  # torch loads here, while shards copy
            residual_of,
            working_copy,
        )

        if self.ran_on is None:
            self.ran_on = resolve_device(self.run.device)
        if info.name not in self.by_tensor:  # --quantize-all: a weight without factors
            return _split(info.name, quantize(W, dtype=self.out_dtype or info.dtype), {})
        job = self.by_tensor[info.name]
        A0, B0, stats = self.sharing.result(info.name, partial(self._own, job, W))  # or from the rank that did them
        Wc, self._held = (self._held if self._held is not None else working_copy(job, W, self.ran_on)), None
        if self.quant:
            return self._quantized(job, info, W, Wc, A0, B0, stats)
        stored, recon = residual_of(job, Wc, A0, B0, self.run.params.scale, out_dtype=self.out_dtype)
        stored = stored.cpu().contiguous()
        stats = {
            **stats,
            **recon,
            "source_sample": sample(tensor_bytes(W)),
            "residual_sample": sample(tensor_bytes(stored)),
        }
        return Replaced(stored, {"A": A0, "B": B0}, stats)

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
        return _split(
            info.name,
            q,
            {
                **stats,
                **qstats,
                "source_sample": sample(tensor_bytes(W)),
                "residual_sample": sample(tensor_bytes(q[""])),
            },
            {"A": A0, "B": B0},
        )

    def device_used(self) -> str:
        from ..devices import resolve_device

        return str(self.ran_on if self.ran_on is not None else resolve_device(self.run.device))


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
