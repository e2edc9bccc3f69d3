"""Floor 7 (beside train.py): measuring a model on a task, with no graph recorded."""
from __future__ import annotations

import contextlib

import numpy as np

from . import backend
from . import functional as F
from .metrics import classification_report, exact_match
from .autograd import no_grad


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no graph inside the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            yield model
    finally:
        model.train(was_training)


def greedy_answers(model, prompts, answer_len: int, batch_size: int = 1000) -> np.ndarray:
    """Generate ``answer_len`` tokens after each prompt (N, P) by argmax; returns (N, answer_len)."""
    out = [backend.to_numpy(model.generate(prompts[i:i + batch_size], answer_len, temperature=0))[:, -answer_len:]
           for i in range(0, len(prompts), batch_size)]
    return np.concatenate(out)


def exact_match_accuracy(model, task, split: str = "test", limit: int | None = None) -> float:
    """Share of problems whose whole answer the model writes exactly right (greedy decoding)."""
    prompts, answers = task.examples(split)
    if limit is not None:
        prompts, answers = prompts[:limit], answers[:limit]
    return exact_match(greedy_answers(model, prompts, task.answer_len), answers)


def classify(model, x, lengths, batch_size: int = 1000) -> np.ndarray:
    """Predicted class ids (N,) for inputs x (N, T) with real lengths (N,)."""
    with evaluating(model):
        preds = [backend.to_numpy(model(x[i:i + batch_size], lengths[i:i + batch_size])[0].data.argmax(-1))
                 for i in range(0, len(x), batch_size)]
    return np.concatenate(preds)


def classification_metrics(model, task, split: str = "test") -> dict:
    """Accuracy, per-class and macro precision/recall/F1 and the confusion counts."""
    x, lengths, labels = task.examples(split)
    return classification_report(labels, classify(model, x, lengths), task.n_classes)


def mean_loss(model, batches) -> float:
    """Average of ``model(*batch)[1]`` over batches (e.g. a fixed validation set)."""
    with evaluating(model):
        return float(np.mean([model(*batch)[1].item() for batch in batches]))


def answer_loss(model, task, split: str = "test", limit: int = 2000) -> float:
    """Cross-entropy on the answer tokens of a task's problems (prompt tokens ignored)."""
    prompts, answers = task.examples(split)
    seqs = np.concatenate([prompts, answers], axis=1)[:limit]
    targets = seqs[:, 1:].copy()
    targets[:, :prompts.shape[1] - 1] = -100
    with evaluating(model):
        return F.cross_entropy(model(seqs[:, :-1])[0], targets).item()
