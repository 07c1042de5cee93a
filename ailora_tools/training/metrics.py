"""Evaluation metrics of sequence classification and regression, computed by scikit-learn and SciPy.

GLUE's metrics: accuracy (every classification task), F1 (MRPC, QQP: of class 1 for two classes, macro-averaged
for more), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B, a regression with one output).
Every metric is reported at every evaluation (`eval_<name>` in metrics.jsonl); a correlation of constant
predictions is undefined and reported as None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: metric -> True when higher is better (losses: lower)
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "matthews": True, "pearson": True, "spearman": True, "loss": False}


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy, f1 (binary: of class 1; more classes: macro average) and matthews (Matthews correlation)."""
    import warnings

    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    with warnings.catch_warnings():  # a class never predicted: F1 0 for it, as scikit-learn defines it
        warnings.simplefilter("ignore")
        f1 = (
            f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0)
            if num_labels == 2
            else f1_score(labels, predictions, average="macro", labels=list(range(num_labels)), zero_division=0)
        )
        return {
            "accuracy": float(accuracy_score(labels, predictions)),
            "f1": float(f1),
            "matthews": float(matthews_corrcoef(labels, predictions)),
        }


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float | None]:
    """pearson and spearman correlation of predictions with labels (None where undefined: constant input)."""
    import warnings

    from scipy.stats import pearsonr, spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: SciPy warns and returns NaN
        pearson = float(pearsonr(predictions, labels)[0]) if len(labels) > 1 else math.nan
        spearman = float(spearmanr(predictions, labels)[0]) if len(labels) > 1 else math.nan
    return {"pearson": None if math.isnan(pearson) else pearson, "spearman": None if math.isnan(spearman) else spearman}


def better(metric: str, a: float | None, b: float | None) -> bool:
    """Whether value `a` of `metric` is better than `b` (None is worst)."""
    if a is None:
        return False
    if b is None:
        return True
    return a > b if HIGHER_IS_BETTER[metric] else a < b
