"""Architectures: what a checkpoint's model class was made for, and module names as the class users load names them.

What a class is for is data (`HEADS`): the suffix of the class name config.json's `architectures` records gives
the training task (`saved_task`), PEFT's task type (`peft_task_type`) and the Auto class that loads it
(`auto_class`). Every module that asks "is this a classifier?" or "which PEFT task?" asks here.

A task model holds its base model under the class's `base_model_prefix`: BertForSequenceClassification and
BertForMaskedLM name a module `bert.encoder.layer.0.attention.self.query`, while a bare BertModel checkpoint
(sentence-transformers saves them so) stores `encoder.layer.0.attention.self.query.weight`. transformers loads
either into either class by adding or stripping that prefix key by key. PEFT does not: an adapter's keys must be
the module names of the class it is loaded on. `match` applies transformers' rule to any names, so that train,
convert and merge pair an adapter's modules with a checkpoint's tensors (or another adapter's modules) whatever
prefix each carries.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from .errors import UnsupportedError

CAUSAL_LM, MASKED_LM, CLASSIFY = "causal-lm", "masked-lm", "sequence-classification"

#: class-name suffix -> (training task, PEFT task type, transformers Auto class); the first suffix found wins
HEADS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("ForSequenceClassification", CLASSIFY, "SEQ_CLS", "AutoModelForSequenceClassification"),
    ("ForCausalLM", CAUSAL_LM, "CAUSAL_LM", "AutoModelForCausalLM"),
    ("LMHeadModel", CAUSAL_LM, None, "AutoModelForCausalLM"),  # GPT-2: PEFT's task type stays unset, as saved
    ("ForConditionalGeneration", CAUSAL_LM, None, "AutoModelForCausalLM"),
    ("ForMaskedLM", MASKED_LM, None, "AutoModelForMaskedLM"),
    ("ForPreTraining", MASKED_LM, None, "AutoModelForMaskedLM"),  # BERT's pre-training head holds the MLM head
    ("ForTokenClassification", None, "TOKEN_CLS", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", None, "QUESTION_ANS", "AutoModelForQuestionAnswering"),
)


def _head(config) -> tuple | None:
    names = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    arch = " ".join(names or [])
    return next((row for row in HEADS if row[0] in arch), None)


def saved_task(config) -> str | None:
    """The task the model in `config` (a config.json dict or a transformers config) was saved for, if known.

    Example:
        >>> saved_task({"architectures": ["BertForSequenceClassification"]})
        'sequence-classification'
    """
    return (_head(config) or (None, None))[1]


def task_of(name: str, config: dict) -> str:
    """The task `name` ("auto" or a task) means for the model in `config`: for "auto", the one it was saved for, or for
    a bare base model masked LM when its model type has a masked-LM class, causal LM otherwise. Imports transformers
    only for a bare model."""
    if name != "auto":
        return name
    if (saved := saved_task(config)) in (CAUSAL_LM, MASKED_LM, CLASSIFY):
        return saved
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return MASKED_LM if config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES else CAUSAL_LM


def peft_task_type(config) -> str | None:
    """PEFT's task type for an adapter on the model in `config` ("CAUSAL_LM", "SEQ_CLS", ...), or None."""
    return (_head(config) or (None, None, None))[2]


#: the modules PEFT saves whole (`modules_to_save`) for a SEQ_CLS adapter: it adds them when loading one
PEFT_HEADS = ("classifier", "score")


def head_tensors(names: Iterable[str], config) -> list[str]:
    """The tensors of `names` (a checkpoint's) that PEFT loads from a SEQ_CLS adapter's `modules_to_save` for the
    model in `config` (its `classifier`/`score` head); empty for any other task type.

    Example:
        >>> head_tensors(["bert.pooler.dense.weight", "classifier.weight"],
        ...              {"architectures": ["BertForSequenceClassification"]})
        ['classifier.weight']
    """
    if peft_task_type(config) != "SEQ_CLS":
        return []
    return sorted(n for n in names if n.split(".", 1)[0] in PEFT_HEADS)


def auto_class(peft_task: str | None) -> str | None:
    """The transformers Auto class an adapter of PEFT task type `peft_task` applies to, or None."""
    return next((row[3] for row in HEADS if peft_task and row[2] == peft_task), None)


def base_model_prefix(config: dict) -> str | None:
    """transformers' `base_model_prefix` for a model config ("bert", "roberta", "model", ...), or None when unknown.

    Imports transformers (seconds on a small machine); `match` asks only when a name is not found as it is.

    Example:
        >>> base_model_prefix({"model_type": "bert"})  # doctest: +SKIP
        'bert'
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(config.get("model_type", ""))
    name = name[0] if isinstance(name, (list, tuple)) else name
    cls = getattr(transformers, name, None) if name else None
    return getattr(cls, "base_model_prefix", None) or None


def rename(name: str, available: Collection[str], prefix: str | None) -> str | None:
    """`name` as `available` spells it: as is, else without a leading `prefix.`, else with it added; None if absent."""
    if name in available:
        return name
    if prefix:
        for candidate in (name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None, f"{prefix}.{name}"):
            if candidate is not None and candidate in available:
                return candidate
    return None


def match(
    names: Iterable[str], available: Collection[str], *, prefix: str | None = None, config: dict | None = None
) -> dict[str, str]:
    """Map each of `names` to the name `available` holds for the same module or tensor (see `rename`).

    Args:
        names: module or tensor names on one side (e.g. an adapter's modules).
        available: the names on the other side (e.g. a checkpoint's module names).
        prefix: the base model prefix; when None and `config` is given, `base_model_prefix(config)`, looked up
            only if some name is not found as it is.

    Returns:
        name -> its spelling in `available`; names found nowhere are left out (the caller names them in its error).

    Example:
        >>> match(["bert.encoder.layer.0.attention.self.query"], {"encoder.layer.0.attention.self.query"},
        ...       prefix="bert")
        {'bert.encoder.layer.0.attention.self.query': 'encoder.layer.0.attention.self.query'}
    """
    names = list(names)
    if prefix is None and config is not None and any(n not in available for n in names):
        prefix = base_model_prefix(config)
    return {n: found for n in names if (found := rename(n, available, prefix)) is not None}


def linear_layers(config: dict, model=None) -> list[str]:
    """PEFT's `all-linear`: the names of every `nn.Linear` / `Conv1D` layer of `model` (default: the class config.json
    names, built on the meta device, no weights) except the output head (the output embeddings, or a SEQ_CLS model's
    `classifier`/`score`), as `peft.tuners.tuners_utils._maybe_include_all_linear_layers` selects them.

    Imports transformers and torch (seconds); only `all-linear` asks.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    if model is None:
        import transformers
        from transformers import AutoConfig, AutoModel

        names = config.get("architectures") or []
        cls = getattr(transformers, names[0], None) if names else None
        try:
            cfg = AutoConfig.for_model(**config)
            with torch.device("meta"):
                model = cls._from_config(cfg) if cls else AutoModel.from_config(cfg)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = " ".join(names) or config.get("model_type")
            raise UnsupportedError(
                f"{{targets}} all-linear: transformers cannot build {what} to list its linear "
                f"layers ({e.__class__.__name__}); name the modules in {{targets}}"
            ) from None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None and peft_task_type(config) == "SEQ_CLS":
        out = next((getattr(model, n) for n in PEFT_HEADS if getattr(model, n, None) is not None), None)
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not out]
