"""What `train` trains an adapter for: causal LM, masked LM or sequence classification.

A task names the transformers class users load the result with (AutoModelForCausalLM, AutoModelForMaskedLM,
AutoModelForSequenceClassification) and PEFT's task type, the JSONL shapes it reads (`data`), what a batch holds
and what evaluation reports (loss; accuracy too for classification). `auto` takes the task the checkpoint was saved
for, from its config's `architectures` (...ForSequenceClassification, ...ForMaskedLM or ...ForPreTraining,
...ForCausalLM); a bare base model (BertModel, LlamaModel) gets masked LM when its model type has a masked-LM
class, causal LM otherwise.

The adapter is built on that class, so its module names are the class's (`model_names` pairs them with the
initial adapter's, whatever prefix the checkpoint's tensors carry). Weights the class needs that the checkpoint
lacks are a head. For sequence classification the head (a new classifier, seeded, or the checkpoint's own;
also e.g. BERT's pooler when a masked-LM checkpoint has none) trains with the adapter and is saved as PEFT's
`modules_to_save`. For the LM tasks every weight must come from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..architectures import CAUSAL_LM, CLASSIFY, MASKED_LM, match, task_of
from ..errors import TargetError, UnsupportedError
from ..io.examples import (
    IGNORE,
    Columns,
    collate,
    collate_labeled,
    load_jsonl,
    load_masked_jsonl,
)
from ..io.labels import label_ids, read_labeled, tokenize_labeled
from ..io.peft_adapter import load_into, read_adapter
from ..manifests import frozen_factors
from ..options import TASKS as CHOICES
from .experts import expert_training
from .frozen import freeze_factors


@dataclass(frozen=True)
class Task:
    """One training objective: the transformers Auto class it loads and PEFT's task type."""

    name: str
    auto_class: str
    peft_task_type: str | None

    @property
    def classifies(self) -> bool:
        return self.name == CLASSIFY

    def loss_weight(self, labels: torch.Tensor) -> int:
        """How many terms the batch's mean loss averages: examples, or tokens with a label (shifted for causal LM)."""
        if self.classifies:
            return labels.numel()
        return int(((labels[:, 1:] if self.name == CAUSAL_LM else labels) != IGNORE).sum())


TASKS = {
    t.name: t
    for t in (
        Task(CAUSAL_LM, "AutoModelForCausalLM", "CAUSAL_LM"),
        Task(MASKED_LM, "AutoModelForMaskedLM", None),
        Task(CLASSIFY, "AutoModelForSequenceClassification", "SEQ_CLS"),
    )
}


def resolve_task(name: str, config: dict) -> Task:
    """The task `name` names, or for "auto" the one the model `config` was saved for (see the module docstring).

    Raises:
        TargetError: an unknown name.
        UnsupportedError: an encoder-decoder (sequence-to-sequence) model, such as T5.
    """
    if name not in CHOICES:
        raise TargetError(f"--task {name!r}: choose one of {', '.join(CHOICES)}")
    if config.get("is_encoder_decoder"):
        kind = " ".join(config.get("architectures") or []) or config.get("model_type", "this model")
        raise UnsupportedError(
            f"{kind} is an encoder-decoder (sequence-to-sequence) model; train supports "
            "decoder-only causal LMs and encoders (masked LM, sequence classification). decompose, "
            "convert and merge take it: train OUT/adapter on OUT/residual with PEFT and "
            "transformers' Seq2SeqTrainer, then convert or merge it here"
        )
    return TASKS[task_of(name, config)]


@dataclass
class Data:
    """Tokenized training and evaluation examples, how to batch them, and (classification) the head's labels."""

    train: list
    eval: list
    collate: Callable[[list], dict[str, torch.Tensor]]
    labels: dict | None  # num_labels, id2label, label2id, problem_type (pad_token_id): the model's and merged config


def load_data(
    task: Task,
    data: str | os.PathLike,
    eval_data: str | os.PathLike | None,
    tokenizer,
    *,
    pad_id: int,
    config: dict,
    base: object,
    max_length: int,
    seed: int,
    num_labels: int | None = None,
    columns: Columns | None = None,
) -> Data:
    """Read, validate and tokenize the data for `task` (before any model loads).

    Args:
        pad_id: the token batches are padded with (`tokenizer.load_tokenizer`).
        config: the base model's config (a classification head it already has fixes the labels).
        base: the base model's path, for messages. num_labels: --num-labels (classification only; 1: regression,
            float labels and problem_type "regression"). columns: --text-column, --text-pair-column, --label-column.

    Raises:
        FormatError: a bad line, labels of mixed types, a gap in the class ids, a label only `eval_data` has, or
            more labels than the head has (`labels.label_ids`).
        TargetError: --num-labels for another task, or a tokenizer without what the task needs.
    """
    if num_labels is not None and not task.classifies:
        raise TargetError(f"--num-labels {num_labels}: applies to --task {CLASSIFY} only (this run: {task.name})")
    if task.classifies:
        regression = num_labels == 1
        rows = read_labeled(data, columns=columns, regression=regression)
        eval_rows = (
            read_labeled(eval_data, flag="--eval-data", columns=columns, regression=regression) if eval_data else []
        )
        ids, labels = label_ids(
            rows, eval_rows, data=data, eval_data=eval_data, config=config, base=base, num_labels=num_labels
        )
        if config.get("pad_token_id") is None:  # decoders classify at the last token that is not padding
            labels["pad_token_id"] = pad_id
        return Data(
            tokenize_labeled(rows, tokenizer, ids, max_length=max_length),
            tokenize_labeled(eval_rows, tokenizer, ids, max_length=max_length),
            lambda batch: collate_labeled(batch, pad_id),
            labels,
        )
    if task.name == MASKED_LM:
        if tokenizer.mask_token_id is None:
            raise TargetError(f"--task masked-lm: the tokenizer of {base} has no mask token")

        def load(path, s):
            return load_masked_jsonl(path, tokenizer, max_length=max_length, seed=s, columns=columns)
    else:

        def load(path, s):
            return load_jsonl(path, tokenizer, max_length=max_length, columns=columns)

    return Data(
        load(data, seed), load(eval_data, seed + 1) if eval_data else [], lambda batch: collate(batch, pad_id), None
    )


def load_model(
    task: Task, base: str | os.PathLike, adapter: str | os.PathLike, *, labels: dict | None, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict, dict]:
    """The task's class on `base` as a PEFT model holding the initial adapter's factors, under the class's names.

    The head (classification: the weights outside the base model and those the checkpoint lacks) trains with the
    adapter as PEFT's modules_to_save; a new one starts from torch's current seed.

    Returns:
        The PEFT model; the trained adapter's config (the initial one with task_type and modules_to_save); and a
        record for the manifests: task, Auto class, model class, base model prefix, modules_to_save and the
        config keys a merged model needs (`config`).

    Raises:
        UnsupportedError: an LM task whose class needs weights the checkpoint lacks (no LM head).
        TargetError: an adapted module the class does not have.
    """
    from peft import LoraConfig, get_peft_model

    model, heads = load_task_model(task, base, labels=labels, dtype=dtype)
    cls, prefix = type(model).__name__, model.base_model_prefix
    initial = read_adapter(adapter, dora=True)
    experts = expert_training(initial, model.config.to_dict(), source=adapter)  # fused 3-D parameters
    plain = [m for m in initial.factors if m not in experts.factors]
    names = match(plain, {n for n, _ in model.named_modules()}, prefix=prefix)
    if len(names) < len(plain):
        lost = sorted(set(plain) - set(names))
        raise TargetError(
            f"{adapter}: adapts {lost[0]!r}, which {cls} on {base} does not have (nor with or without "
            f"the prefix {prefix!r}); pass the adapter decomposed from this model"
        )
    fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    lora = {k: v for k, v in initial.config.items() if k in fields}
    lora.update(
        target_modules=sorted(names.values()),
        modules_to_save=list(heads) or None,  # PEFT extends it
        task_type=task.peft_task_type,
        inference_mode=False,
        **experts.lora,
    )
    peft_model = get_peft_model(model, LoraConfig(**lora))
    renamed = dataclasses.replace(
        initial,
        factors={**{names[m]: initial.factors[m] for m in plain}, **experts.factors},
        magnitudes={names[m]: v for m, v in initial.magnitudes.items()},
    )
    load_into(peft_model, renamed, source=adapter, extra=False)
    freeze_factors(peft_model, frozen_factors(adapter))  # MiCA's B
    config = {**initial.config, "task_type": task.peft_task_type, "modules_to_save": heads or None, **experts.saved}
    return peft_model, config, describe_task(task, model, heads, labels)


def load_task_model(
    task: Task, base: str | os.PathLike, *, labels: dict | None, dtype: torch.dtype
) -> tuple[torch.nn.Module, list[str]]:
    """The task's transformers class on `base`, and the module names of its head (classification only: the
    children outside the base model, and base modules the checkpoint lacks, such as BERT's pooler).

    Raises:
        UnsupportedError: an LM task whose class needs weights the checkpoint lacks (no LM head).
    """
    import transformers

    model, info = getattr(transformers, task.auto_class).from_pretrained(
        base, dtype=dtype, output_loading_info=True, **(labels or {})
    )
    # transformers keeps a pre-quantised checkpoint's float weights in their stored dtype: cast them as PEFT's
    # prepare_model_for_kbit_training does (the packed NF4 weights are uint8: untouched)
    if getattr(model.config, "quantization_config", None):
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    missing = sorted(info["missing_keys"])
    if missing and not task.classifies:
        raise UnsupportedError(
            f"--task {task.name}: {type(model).__name__} needs weights that {base} lacks ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): it has no {task.name} head; train with --task {CLASSIFY}, or "
            "decompose a checkpoint saved with that head"
        )
    return model, _heads(model, missing) if task.classifies else []


def describe_task(task: Task, model, heads: list[str], labels: dict | None) -> dict:
    """What the manifests record of a trained model's task: task, Auto class, model class, base model prefix,
    head modules and the config keys a merged model needs (`config`)."""
    cls = type(model).__name__
    merged_config = {"architectures": [cls], **{k: v for k, v in labels.items() if k != "num_labels"}} if labels else {}
    return {
        "task": task.name,
        "auto_class": task.auto_class,
        "model_class": cls,
        "base_model_prefix": model.base_model_prefix,
        "modules_to_save": heads,
        "config": merged_config,
    }


def _heads(model, missing: list[str]) -> list[str]:
    """Module names of the head: the model's children outside the base model, and base modules the checkpoint lacks."""
    prefix = model.base_model_prefix
    heads = {n for n, child in model.named_children() if n != prefix and any(True for _ in child.parameters())}
    heads |= {".".join(k.split(".")[:2]) for k in missing if k.startswith(prefix + ".")}
    return sorted(heads)


def evaluate(
    model, task: Task, examples: list, collate_fn: Callable, *, batch_size: int, device: torch.device, autocast: bool
) -> dict[str, float]:
    """Mean loss over the examples (per token for LMs, per example for classification) and, for classification,
    accuracy, F1 and Matthews correlation, or for regression (one output) Pearson and Spearman correlation
    (`metrics`). Leaves the model in train mode."""
    from .metrics import classification_metrics, regression_metrics

    model.eval()
    total, weight, predictions, labels, width = 0.0, 0, [], [], 0
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_fn(examples[i : i + batch_size]).items()}
            out = model(**batch)
            n = task.loss_weight(batch["labels"])
            total += float(out.loss) * n
            weight += n
            if task.classifies:
                width = out.logits.shape[-1]
                logits = out.logits.float()
                predictions += (logits[:, 0] if width == 1 else logits.argmax(-1)).tolist()
                labels += batch["labels"].tolist()
    model.train()
    result = {"eval_loss": total / max(weight, 1)}
    if task.classifies:
        scores = (
            regression_metrics(predictions, labels)
            if width == 1
            else classification_metrics(predictions, labels, width)
        )
        result.update({f"eval_{k}": v for k, v in scores.items()})
    return result
