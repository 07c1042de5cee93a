"""What a training run leaves on disk while it runs: metrics.jsonl and resumable checkpoints.

A checkpoint (`checkpoints/step-N/`) holds the adapter, the optimizer tensors and the RNG state (safetensors, no
pickle) and, written last, `trainer_state.json` (step, data position, param groups, scheduler, and the BLAKE3
digest of every other file of the checkpoint); `--resume` checks the newest complete one against those digests,
restores it and continues exactly. `recorded` gathers every checkpoint's digests for the run's manifest, where
`verify` checks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..distributed import full_tensor, shard_like
from ..errors import FormatError
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import adapter_of, load_into, read_adapter, write_adapter
from ..io.tensorio import load_tensors
from ..manifests import CKPT_DIR
from .bitfit import BitFit

METRICS = "metrics.jsonl"
STATE_NAME, OPTIMIZER_NAME = "trainer_state.json", "optimizer.safetensors"


class Metrics:
    """metrics.jsonl: one JSON record per step, evaluation or final evaluation."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def history(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []

    def start_eval(self) -> dict[str, float] | None:
        """The step-0 evaluation (None if there is none): a resumed run's start is the first run's."""
        for record in self.history():
            if record.get("step") == 0:
                return {k: v for k, v in record.items() if k.startswith("eval_")}
        return None

    def truncate(self, step: int) -> None:
        """Drop the records after `step` (and the final evaluation): what a resumed run will write again."""
        keep = [r for r in self.history() if r.get("step", 0) <= step and not r.get("final")]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


class Checkpointer:
    """Saves and restores the run's state under OUT/checkpoints (published by rename, see `OutputDir`)."""

    def __init__(self, od: OutputDir | None, model, optimizer, scheduler, config: dict):
        self.od, self.model, self.optimizer, self.scheduler, self.config = od, model, optimizer, scheduler, config

    def save(self, state: dict) -> None:
        """checkpoints/step-N/: adapter, optimizer tensors + RNG (safetensors), trainer_state.json last. With no
        output (a rank ≥ 1 of `train --fsdp`) it only takes part in gathering the tensors."""
        rel = f"{CKPT_DIR}/step-{state['step']:07d}"
        tmp = self.od.partial(rel) if self.od is not None else None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        written = write(tmp, self.model, self.config)
        opt = self.optimizer.state_dict()
        tensors = {
            f"state.{i}.{k}": full_tensor(v.detach()).cpu().contiguous()
            for i, s in opt["state"].items()
            for k, v in s.items()
        }
        if tmp is None:
            return
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        files = {p.name: file_digest(p) for p in [*written, tmp / OPTIMIZER_NAME]}
        saved = {**state, "param_groups": opt["param_groups"], "scheduler": self.scheduler.state_dict(), "files": files}
        (tmp / STATE_NAME).write_text(json.dumps(saved, default=str))
        shutil.rmtree(self.od.path / rel, ignore_errors=True)
        self.od.publish(rel)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        done = complete(self.od.path)
        return done[-1] if done else None

    def restore(self, ckpt: Path, state: dict) -> None:
        """Load `ckpt` into the model, optimizer, scheduler and RNG, and its step and data position into `state`.

        Raises:
            FormatError: a file of `ckpt` that is not as its trainer_state.json recorded it, naming it.
        """
        saved = json.loads((ckpt / STATE_NAME).read_text())
        for name, digest in saved.get("files", {}).items():
            if not (ckpt / name).is_file() or file_digest(ckpt / name) != digest:
                raise FormatError(
                    f"{ckpt / name}: missing or not as {STATE_NAME} recorded it (damaged); delete "
                    f"{ckpt} to resume from the checkpoint before it, or start again with --overwrite"
                )
        if isinstance(self.config, BitFit):
            self.config.restore(ckpt, self.model)
        else:
            load_into(self.model, read_adapter(ckpt, dora=True), source=ckpt)
        tensors = load_tensors(ckpt / OPTIMIZER_NAME)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # the state's indices
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, i, k = key.split(".", 2)
                opt_state.setdefault(int(i), {})[k] = value if k == "step" else shard_like(params[int(i)], value)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        state.update({k: saved[k] for k in ("step", "epoch", "pos", "stage") if k in saved})


def complete(out: Path) -> list[Path]:
    """The checkpoints under `out` whose trainer_state.json is written, oldest first."""
    return sorted(p for p in (out / CKPT_DIR).glob("step-*") if (p / STATE_NAME).is_file())


def recorded(out: Path) -> dict[str, str]:
    """Every complete checkpoint's files by their path below `out`, with their digests (as each checkpoint recorded
    them; its trainer_state.json and the files of a checkpoint from an older version, hashed now): what the run's
    manifest lists under files["checkpoints"]."""
    files = {}
    for ckpt in complete(out):
        rel = ckpt.relative_to(out).as_posix()
        saved = json.loads((ckpt / STATE_NAME).read_text()).get("files")
        names = saved or {p.name: None for p in ckpt.iterdir() if p.is_file() and p.name != STATE_NAME}
        files.update({f"{rel}/{n}": d or file_digest(ckpt / n) for n, d in names.items()})
        files[f"{rel}/{STATE_NAME}"] = file_digest(ckpt / STATE_NAME)
    return files


def write(directory: Path | None, model, config: dict | BitFit) -> list[Path]:
    """What `train` publishes and each checkpoint holds: the trained adapter as a PEFT directory (BitFit: the
    trained biases). Under `train --fsdp` every rank calls this (the tensors are gathered); with no `directory`
    nothing is written."""
    if isinstance(config, BitFit):
        return config.write(directory, model)
    trained = adapter_of(model, config)
    if directory is None:
        return []
    return write_adapter(directory, trained.config, trained.factors, extra=trained.extra, magnitudes=trained.magnitudes)


def tokens_per_s(records: list[dict]) -> float | None:
    """Training throughput over metrics records (their tokens over their seconds)."""
    seconds = sum(r.get("seconds", 0.0) for r in records)
    return round(sum(r.get("tokens", 0) for r in records) / seconds, 1) if seconds else None
