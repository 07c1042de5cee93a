"""Progtuning (arXiv 2506.21119): training in K stages, each updating fewer transformer blocks.

The schedule, as the paper defines it for a run of T epochs over L blocks: the blocks are cut into T parts
of ⌊L/T⌋ consecutive blocks, and stage t (one epoch) updates parts t..T, so the lowest part stops first
and the highest part trains throughout. What this module implements, with K = `--progressive K`:

- parts: parts 1..K−1 hold ⌊L/K⌋ consecutive blocks each, from the bottom; the top part holds the rest
  (⌊L/K⌋ plus the L mod K blocks the paper's ⌊L/K⌋ leaves over, which it does not place). Stage k updates
  the blocks from the first block of part k to the last block; adapted modules outside the blocks (none
  for the usual attention/MLP targets) train in every stage, as the paper's classification head does.
- steps: stage k (1-based) runs optimizer steps ⌊(k−1)·N/K⌋+1 .. ⌊k·N/K⌋ of N. With `--epochs K` and no
  `--max-steps` this is one stage per epoch, as in the paper; otherwise the steps are shared out evenly.

The pure functions below are the schedule; `Progressive` applies it to a PEFT model: it turns off
`requires_grad` for the adapters of blocks that no longer train (AdamW then skips them, so they stay
bit-identical) and detaches the hidden state entering the lowest training block, so the backward pass
never reaches the blocks below it.
"""

from __future__ import annotations

import re

import torch

from ..errors import TargetError

_BLOCK = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)(?:\.|$)")


def parts(n_blocks: int, stages: int) -> list[range]:
    """The K parts of L blocks, bottom first: ⌊L/K⌋ blocks each, the top part also taking L mod K.

    Raises:
        TargetError: fewer than one stage, or more stages than blocks.

    Example:
        >>> parts(10, 3)
        [range(0, 3), range(3, 6), range(6, 10)]
    """
    if stages < 1:
        raise TargetError(f"--progressive {stages}: must be at least 1")
    if stages > n_blocks:
        raise TargetError(
            f"--progressive {stages}: the model has {n_blocks} transformer blocks, so at most "
            f"{n_blocks} stages (one part of at least one block each)"
        )
    size = n_blocks // stages
    return [range(k * size, (k + 1) * size if k < stages - 1 else n_blocks) for k in range(stages)]


def stage_bounds(total_steps: int, stages: int) -> list[range]:
    """Per stage, the 0-based optimizer steps it runs: stage k gets ⌊k·N/K⌋ .. ⌊(k+1)·N/K⌋ − 1.

    Raises:
        TargetError: fewer steps than stages.

    Example:
        >>> stage_bounds(10, 3)
        [range(0, 3), range(3, 6), range(6, 10)]
    """
    if total_steps < stages:
        raise TargetError(
            f"--progressive {stages}: training has only {total_steps} steps; each stage needs at "
            "least one (raise --max-steps or --epochs, or use fewer stages)"
        )
    return [range(k * total_steps // stages, (k + 1) * total_steps // stages) for k in range(stages)]


def stage_of(step: int, total_steps: int, stages: int) -> int:
    """The 0-based stage of 0-based optimizer step `step`."""
    return next(k for k, r in enumerate(stage_bounds(total_steps, stages)) if step < r.stop)


def trainable_blocks(stage: int, n_blocks: int, stages: int) -> range:
    """The blocks updated in 0-based `stage`: from the first block of its part to the top."""
    return range(parts(n_blocks, stages)[stage].start, n_blocks)


def updated_fraction(block_params: list[int], other_params: int, total_steps: int, stages: int) -> float:
    """Updated parameter-steps of the schedule against plain training (every parameter, every step).

    Args:
        block_params: trainable parameters in each block (bottom first).
        other_params: trainable parameters outside the blocks (they train in every stage).

    Example:
        >>> updated_fraction([1, 1, 1, 1], 0, 4, 2)  # 4 blocks for 2 steps, then 2 blocks for 2 steps
        0.75
    """
    bounds = stage_bounds(total_steps, stages)
    updated = sum(
        len(bounds[k]) * (sum(block_params[trainable_blocks(k, len(block_params), stages).start :]) + other_params)
        for k in range(stages)
    )
    everything = total_steps * (sum(block_params) + other_params)
    return updated / everything if everything else 1.0


class Progressive:
    """Apply the schedule to a PEFT LoRA model: which adapters train, and where the backward pass stops.

    Args:
        model: the PeftModel being trained.
        stages: K. total_steps: N, the run's optimizer steps.

    Raises:
        TargetError: the adapted modules are not inside one list of numbered blocks, or K does not fit.
    """

    def __init__(self, model, *, stages: int, total_steps: int):
        self.stages, self.total_steps = stages, total_steps
        self.params: dict[int | None, list[torch.nn.Parameter]] = {}  # block index (None: outside) -> LoRA params
        container = None
        for name, p in model.get_base_model().named_parameters():
            if ".lora_" not in name or not p.requires_grad:  # (MiCA's B stays frozen)
                continue
            m = _BLOCK.match(name)
            if m is not None and container not in (None, m["container"]):
                raise TargetError(
                    f"--progressive: adapted modules lie in two block lists ({container} and "
                    f"{m['container']}); Progtuning needs one stack of transformer blocks"
                )
            container = m["container"] if m else container
            self.params.setdefault(int(m["index"]) if m else None, []).append(p)
        if container is None:
            raise TargetError(
                "--progressive: no adapted module lies in a numbered list of transformer blocks "
                "(such as model.layers.N); Progtuning needs one"
            )
        self.blocks = model.get_base_model().get_submodule(container)
        self.n_blocks = len(self.blocks)
        stage_bounds(total_steps, stages)
        parts(self.n_blocks, stages)
        self.stage: int | None = None
        self._hook = None

    def enter(self, step: int) -> int:
        """Set up the stage of 0-based optimizer step `step` (a no-op inside the current stage); return it."""
        stage = stage_of(step, self.total_steps, self.stages)
        if stage == self.stage:
            return stage
        lowest = trainable_blocks(stage, self.n_blocks, self.stages).start
        for block, params in self.params.items():
            for p in params:
                p.requires_grad_(block is None or block >= lowest)
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.blocks[lowest].register_forward_pre_hook(_detach_input, with_kwargs=True)
        self.stage = stage
        return stage

    def before_step(self, step: int) -> dict:
        """The training loop's step hook: enter the stage of `step`; its record gets the stage (1-based)."""
        return {"stage": self.enter(step) + 1}

    def report(self, history: list[dict]) -> dict:
        """For the run's summary: each stage's blocks, steps and tokens/s, and the updated parameter-steps."""
        from .checkpointer import tokens_per_s

        return {
            "progressive": {
                "stages": [
                    {**s, "tokens_per_s": tokens_per_s([r for r in history if r.get("stage") == s["stage"]])}
                    for s in self.describe()
                ],
                "updated_parameter_fraction": self.updated_fraction(),
            }
        }

    def block_params(self) -> tuple[list[int], int]:
        """Trainable parameter counts per block (bottom first) and outside the blocks."""
        counts = [sum(p.numel() for p in self.params.get(b, [])) for b in range(self.n_blocks)]
        return counts, sum(p.numel() for p in self.params.get(None, []))

    def updated_fraction(self) -> float:
        """Updated parameter-steps of this run against plain training."""
        counts, other = self.block_params()
        return updated_fraction(counts, other, self.total_steps, self.stages)

    def describe(self) -> list[dict]:
        """Per stage (1-based): the blocks it updates and its optimizer steps (1-based, inclusive)."""
        bounds = stage_bounds(self.total_steps, self.stages)
        return [
            {
                "stage": k + 1,
                "blocks": [trainable_blocks(k, self.n_blocks, self.stages).start, self.n_blocks - 1],
                "steps": [bounds[k].start + 1, bounds[k].stop],
            }
            for k in range(self.stages)
        ]


def _detach_input(_module, args, kwargs):
    """Forward pre-hook: the block's hidden-state input leaves the autograd graph."""
    if args:
        return (args[0].detach(),) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
