"""What a training run leaves on disk while it runs: metrics.jsonl and resumable checkpoints.

A checkpoint (`checkpoints/step-N/`) holds the adapter, the optimizer tensors and the RNG state (safetensors, no
pickle) and, written last, `trainer_state.json` (step, data position, param groups, scheduler); `--resume`
restores the newest complete one and continues exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..distributed import full_tensor, shard_like
from ..io.output import OutputDir
from ..io.peft_adapter import adapter_of, load_into, read_adapter, write_adapter
from ..io.tensorio import load_tensors
from .bitfit import BitFit

CKPT_DIR = "checkpoints"
METRICS = "metrics.jsonl"


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
        write(tmp, self.model, self.config)
        opt = self.optimizer.state_dict()
        tensors = {f"state.{i}.{k}": full_tensor(v.detach()).cpu().contiguous() for i, s in opt["state"].items()
                   for k, v in s.items()}
        if tmp is None:
            return
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {**state, "param_groups": opt["param_groups"], "scheduler": self.scheduler.state_dict()}, default=str))
        shutil.rmtree(self.od.path / rel, ignore_errors=True)
        self.od.publish(rel)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        done = sorted(p for p in (self.od.path / CKPT_DIR).glob("step-*") if (p / "trainer_state.json").is_file())
        return done[-1] if done else None

    def restore(self, ckpt: Path, state: dict) -> None:
        """Load `ckpt` into the model, optimizer, scheduler and RNG, and its step and data position into `state`."""
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        if isinstance(self.config, BitFit):
            self.config.restore(ckpt, self.model)
        else:
            load_into(self.model, read_adapter(ckpt, dora=True), source=ckpt)
        tensors = load_tensors(ckpt / "optimizer.safetensors")
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
