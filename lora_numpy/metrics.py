"""Floor 2: evaluation metrics, in plain NumPy on the host.

* :func:`exact_match` – for generated answers: a row counts only if every token is right, since
  "042" for 7 + 35 is right and "043" is as wrong as "999".
* :func:`confusion_matrix` and :func:`classification_report` – for classifiers, where accuracy
  alone misleads on imbalanced classes: a model that always predicts the most common class can
  score well while never recognising the others.
* :func:`entity_scores` (with :func:`bio_entities`) – entity-level precision, recall and F1 for
  named-entity recognition, as seqeval defines them; :func:`token_accuracy` beside it, to show
  why per-token scores flatter.
* :func:`chrf` – character n-gram F-score for generated text, as sacrebleu computes it.

Inputs may be lists, NumPy or CuPy arrays; they are brought to the host first.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

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


# ---- sequence labelling (NER) -------------------------------------------------------------------

def bio_entities(tags) -> list:
    """The entities of one BIO tag sequence as (type, start, end) with ``end`` inclusive, read
    the way seqeval (and CoNLL's conlleval) read them in their default mode: an entity starts at
    ``B-X``, or at ``I-X`` after ``O`` or after a tag of another type, and ends before the next
    tag that is ``O``, ``B-`` or of another type. So ``B-PER I-LOC`` is two entities."""
    entities, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, new_kind = tag.partition("-")
        if prefix not in ("B", "I", "O") or (prefix == "O") != (tag == "O"):
            raise ValueError(f"tag {tag!r} at position {i} is not BIO (O, B-TYPE or I-TYPE)")
        if start is not None and (prefix != "I" or new_kind != kind):
            entities.append((kind, start, i - 1))
            start = None
        if start is None and prefix != "O":
            start, kind = i, new_kind
    return entities


@dataclass
class EntityScores:
    """Entity-level scores (micro-averaged over types, as seqeval's default), and per type."""
    precision: float
    recall: float
    f1: float
    n_true: int        # entities in the references
    n_pred: int        # entities predicted
    n_correct: int     # predicted entities whose span and type are both exact
    per_type: dict     # type -> (precision, recall, f1, support)


def _prf(correct: int, n_pred: int, n_true: int) -> tuple:
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_scores(true_tags, pred_tags) -> EntityScores:
    """Entity-level precision, recall and F1 of predicted BIO tags (seqeval's definition).

    An entity counts as correct only if the prediction has an entity of the same type with
    exactly the same start and end: a wrong type, one character too many, or an entity split in
    two are all misses (and the wrong piece is a false positive too). With C correct entities,
    P predicted and T true ones:  precision = C / P,  recall = C / T,
    F1 = 2 · precision · recall / (precision + recall)  (0 when a denominator is 0).

    Args:
        true_tags, pred_tags: lists of sentences, each a list of tag strings of equal length.
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true sentences but {len(pred_tags)} predicted")
    true_set, pred_set = set(), set()
    for row, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {row}: {len(t)} true tags but {len(p)} predicted")
        true_set.update((row, *e) for e in bio_entities(t))
        pred_set.update((row, *e) for e in bio_entities(p))
    correct = true_set & pred_set
    per_type = {}
    for kind in sorted({e[1] for e in true_set | pred_set}):
        count = lambda s: sum(e[1] == kind for e in s)  # noqa: E731
        per_type[kind] = (*_prf(count(correct), count(pred_set), count(true_set)), count(true_set))
    return EntityScores(*_prf(len(correct), len(pred_set), len(true_set)), len(true_set),
                        len(pred_set), len(correct), per_type)


def token_accuracy(true_ids, pred_ids, ignore_index: int = -100) -> float:
    """Share of labelled positions (true label != ignore_index) whose label is right.

    On NER it flatters: most characters are ``O``, so a model that finds no entity at all
    already scores the share of ``O``, and one that gets every entity wrong by one character
    still scores nearly 100%."""
    true, pred = backend.to_numpy(true_ids), backend.to_numpy(pred_ids)
    if true.shape != pred.shape:
        raise ValueError(f"true_ids {true.shape} and pred_ids {pred.shape} differ in shape")
    counted = true != ignore_index
    if not counted.any():
        raise ValueError("token_accuracy needs at least one labelled position")
    return float((true[counted] == pred[counted]).mean())


# ---- generated text (translation) ---------------------------------------------------------------

def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypotheses, references, char_order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015) as sacrebleu's ``CHRF()`` computes it by default
    (char_order 6, word_order 0, β = 2, whitespace removed, no lowercasing): 0..100.

    Whitespace is deleted from each string, then for every order n = 1..6 the character
    n-grams of hypothesis and reference are counted; a match is min(count in hyp, count in ref).
    Matches, hypothesis n-grams and reference n-grams are summed over the whole corpus. Per
    order: P_n = matches / hyp n-grams, R_n = matches / ref n-grams; the orders where both
    counts are non-zero are averaged (P̄, R̄: the "effective order"), and

        chrF = 100 · (1 + β²) · P̄ · R̄ / (β² · P̄ + R̄),

    so β = 2 weighs recall twice as much as precision.

    Args:
        hypotheses, references: equal-length lists of strings (one reference per hypothesis).
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"chrf needs as many hypotheses as references (at least one), got "
                         f"{len(hypotheses)} and {len(references)}")
    stats = np.zeros((char_order, 3))  # per order: hyp n-grams, ref n-grams, matches
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, char_order + 1):
            h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
            stats[n - 1] += (sum(h.values()), sum(r.values()), sum((h & r).values()))
    usable = (stats[:, 0] > 0) & (stats[:, 1] > 0)
    if not usable.any():
        return 0.0
    precision = (stats[usable, 2] / stats[usable, 0]).mean()
    recall = (stats[usable, 2] / stats[usable, 1]).mean()
    if precision + recall == 0:
        return 0.0
    factor = beta ** 2
    return float(100 * (1 + factor) * precision * recall / (factor * precision + recall))
