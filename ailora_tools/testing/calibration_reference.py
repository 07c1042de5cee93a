"""LoRA-DA statistics from the whole model with hooks, as the authors' code collects them.

The reference for `ailora_tools.init.lora_da.calibration`: tests/init/test_calibration.py checks the layer-wise engine
against it, and bench_calibration.py times both. The whole model is loaded; each sample runs alone
(the authors' batch size 1); Z and E[g²] come from hooks on each target module over the token mask
(each module its own Z, nothing shared), G from the weights' `.grad` summed over samples; the loss is
transformers' own (`model(input_ids, labels=...).loss`, a mean over the sample's loss tokens; for an
encoder the task class's: masked-LM, or classification through the head, a new one drawn after
`torch.manual_seed(seed)` as `train` draws it).
"""

from __future__ import annotations

from functools import partial

import torch

IGNORE = -100


def reference_statistics(
    model_dir,
    examples,
    modules,
    *,
    token_mask: str = "attention",
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    labels: dict | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """name -> {"z", "y", "g", "tokens", "samples", "loss"} for each module (float32 tensors); `modules` as the
    checkpoint names them (a bare encoder's without the task class's prefix)."""
    model, named = _load(model_dir, modules, task=task, dtype=dtype, labels=labels, seed=seed)
    sums = {
        m: {"z": torch.zeros(named[m].in_features, named[m].in_features), "y": torch.zeros(named[m].out_features)}
        for m in modules
    }
    state: dict = {}

    def take_input(name, _module, args):
        x = args[0].detach()[0][state["mask"]].float()
        sums[name]["z"] += x.T @ x

    def take_gradient(name, g):
        sums[name]["y"] += g[0][state["mask"]].float().square().sum(0)

    def take_output(name, _module, _args, out):
        out.register_hook(partial(take_gradient, name))

    handles = []
    for m in modules:
        named[m].weight.requires_grad_(True)
        handles += [
            named[m].register_forward_pre_hook(partial(take_input, m)),
            named[m].register_forward_hook(partial(take_output, m)),
        ]
    tokens, samples, loss_sum = 0, 0, 0.0
    for e in examples:
        inputs, where = _inputs(e, task)
        if task != "sequence-classification" and not bool(where.any()):
            continue
        state["mask"] = torch.ones(len(e.input_ids), dtype=torch.bool) if token_mask == "attention" else where
        loss = model(**inputs).loss
        loss.backward()
        tokens, samples, loss_sum = tokens + int(state["mask"].sum()), samples + 1, loss_sum + loss.item()
    for h in handles:
        h.remove()
    return {
        m: {
            "z": sums[m]["z"] / tokens,
            "y": sums[m]["y"] / tokens,
            "g": named[m].weight.grad.float() / samples,
            "tokens": tokens,
            "samples": samples,
            "loss": loss_sum / samples,
        }
        for m in modules
    }


def _inputs(e, task: str) -> tuple[dict, torch.Tensor]:
    """The model's inputs for one sample (batch of 1), and the positions whose outputs enter the loss."""
    inputs = {"input_ids": torch.tensor([e.input_ids])}
    where = torch.zeros(len(e.input_ids), dtype=torch.bool)
    if task == "sequence-classification":
        inputs["labels"] = torch.tensor([e.label])
        if e.token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([e.token_type_ids])
        where[0] = True
        return inputs, where
    inputs["labels"] = torch.tensor([e.labels])
    if task == "causal-lm":
        where[:-1] = inputs["labels"][0, 1:] != IGNORE
    else:
        where = inputs["labels"][0] != IGNORE
    return inputs, where


def _load(model_dir, modules, *, task: str, dtype: torch.dtype, labels: dict | None, seed: int) -> tuple:
    """The whole model of the task class, frozen (a new head drawn after `torch.manual_seed(seed)`), and its modules
    by name, `modules` also under the names without the base model prefix."""
    import transformers

    auto = {
        "causal-lm": "AutoModelForCausalLM",
        "masked-lm": "AutoModelForMaskedLM",
        "sequence-classification": "AutoModelForSequenceClassification",
    }[task]
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_pretrained(model_dir, dtype=dtype, **(labels or {}))
    model = model.eval().requires_grad_(False)
    named = dict(model.named_modules())
    prefix = model.base_model_prefix + "."
    named.update({m: named[prefix + m] for m in modules if m not in named})
    return model, named
