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


def greedy_until_stop(model, prompts: list, stop_id: int, max_new_tokens: int,
                      pad_id: int | None = None) -> list:
    """Greedy decoding of a causal LM from prompts of different lengths, each stopping at its
    own stop token.

    Args:
        prompts: list of 1-D int arrays (token ids), lengths may differ.
        stop_id: the token that ends an answer (not included in the result).
        max_new_tokens: the most tokens generated per prompt.
        pad_id: fills the buffer after each row's end (default: stop_id).
    Returns:
        a list of 1-D int64 arrays, the generated tokens of each prompt before its stop token.

    All rows share one right-padded buffer, and step k reads row i's logits at its own last
    position. Causal attention makes this exact: a position never sees the padding after it,
    so one forward pass per step serves every unfinished row, whatever its length.
    """
    if getattr(getattr(model, "config", None), "causal", True) is False:
        raise ValueError("greedy decoding needs a causal (decoder) model; this one has causal=False")
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max()) + max_new_tokens
    block_size = model.config.block_size
    if width > block_size + 1:
        raise ValueError(f"prompt + {max_new_tokens} new tokens need {width - 1} positions, "
                         f"more than block_size {block_size}; lower max_new_tokens")
    buffer = np.full((len(prompts), width), stop_id if pad_id is None else pad_id, dtype=np.int64)
    for row, p in enumerate(prompts):
        buffer[row, :len(p)] = p
    done = np.zeros(len(prompts), dtype=bool)
    cursor = lengths.copy()  # where each row's next token goes
    with evaluating(model):
        for _ in range(max_new_tokens):
            active = np.flatnonzero(~done & (cursor < width))  # a finished row needs no more passes
            if not active.size:
                break
            end = min(int(cursor[active].max()), block_size)
            logits = backend.to_numpy(model(buffer[active, :end])[0].data)
            nxt = logits[np.arange(active.size), np.minimum(cursor[active], end) - 1].argmax(-1)
            buffer[active, cursor[active]] = nxt
            done[active] |= nxt == stop_id
            cursor[active] += 1
    out = []
    for row, p in enumerate(prompts):
        generated = buffer[row, len(p):cursor[row]]
        stops = np.flatnonzero(generated == stop_id)
        out.append(generated[:stops[0]] if len(stops) else generated)
    return out
