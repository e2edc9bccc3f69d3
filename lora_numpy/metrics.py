"""Floor 2: evaluation metrics, in plain NumPy on the host.

* :func:`exact_match` – for generated answers: a row counts only if every token is right, since
  "042" for 7 + 35 is right and "043" is as wrong as "999".
* :func:`confusion_matrix` and :func:`classification_report` – for classifiers, where accuracy
  alone misleads on imbalanced classes: a model that always predicts the most common class can
  score well while never recognising the others.

Inputs may be lists, NumPy or CuPy arrays; they are brought to the host first.
"""
from __future__ import annotations

import numpy as np

from . import backend


def exact_match(pred_ids, true_ids) -> float:
    """Share of rows predicted right in full.

    Args:
        pred_ids, true_ids: (N, L) integer token ids, e.g. predicted and true answers.
    Returns:
        a float in [0, 1]: (rows equal in every position) / N.
    """
    pred, true = backend.to_numpy(pred_ids), backend.to_numpy(true_ids)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(
            f"pred_ids and true_ids must both have shape (N, L), got {pred.shape} and {true.shape}"
        )
    if len(pred) == 0:
        raise ValueError("exact_match needs at least one row")
    return float(np.mean(np.all(pred == true, axis=1)))


def _class_labels(y, n_classes: int, name: str) -> np.ndarray:
    """``y`` as a 1-D int64 host array of labels in 0..n_classes-1, or a clear error."""
    y = backend.to_numpy(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, shape (N,), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(
            f"{name} holds label {int(y[np.argmax(bad)])}, outside 0..{n_classes - 1} "
            f"for n_classes={n_classes}"
        )
    return y


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        y_true, y_pred: (N,) integer labels in 0..n_classes-1.
    Returns:
        (n_classes, n_classes) int64; entry [i, j] counts examples of true class i predicted as
        class j (rows are true classes, columns predictions, as in scikit-learn), so the diagonal
        holds the correct predictions.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    true = _class_labels(y_true, n_classes, "y_true")
    pred = _class_labels(y_pred, n_classes, "y_pred")
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} labels but y_pred has {len(pred)}")
    # Each (i, j) pair gets its own flat index i * n_classes + j; counting those indices and
    # folding them back into a square fills the whole matrix in one pass.
    counts = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den element-wise, with 0 wherever den is 0."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def classification_report(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy plus per-class and macro-averaged precision, recall and F1.

    For class c: precision = (correct predictions of c) / (predictions of c), "when the model
    says c, how often is it right?"; recall = (correct predictions of c) / (examples of c), "how
    many of the c's does it find?"; F1 = 2 * precision * recall / (precision + recall), their
    harmonic mean, high only when both are. By convention, as in scikit-learn, a class that is
    never predicted has precision 0, a class with no examples has recall 0, and F1 is 0 when
    precision and recall are both 0.

    Macro averages weigh every class equally (a plain mean over the n_classes classes), so a
    rare class that the model ignores pulls them down even when accuracy looks good.

    Args:
        y_true, y_pred: (N,) integer labels in 0..n_classes-1, N >= 1.
    Returns:
        a JSON-ready dict: ``accuracy`` (float); ``precision``, ``recall``, ``f1`` (lists of
        n_classes floats); ``support`` (list of n_classes ints, the examples of each true class);
        ``macro_precision``, ``macro_recall``, ``macro_f1`` (floats).
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    if cm.sum() == 0:
        raise ValueError("classification_report needs at least one example")
    correct = np.diag(cm)
    support = cm.sum(axis=1)  # row sums: examples of each true class
    predicted = cm.sum(axis=0)  # column sums: predictions of each class
    precision = _safe_divide(correct, predicted)
    recall = _safe_divide(correct, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {
        "accuracy": float(correct.sum() / cm.sum()),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }
