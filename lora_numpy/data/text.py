"""Floor 2: text corpora and the random batches a language model trains on.

A language model learns to predict the next token. From one long stream of token ids we cut
random windows of ``block_size + 1`` tokens; the first ``block_size`` are the input ``x`` and the
last ``block_size`` (the same window shifted by one) are the targets ``y``, so every position of
a window is one training example: "given the tokens so far, what comes next?".

The helpers :func:`random_indices` and :func:`pick_split` are shared with the task datasets in
``tasks.py``, which batch the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokenizer import CharTokenizer


def random_indices(rng: np.random.Generator, high: int, batch_size: int) -> np.ndarray:
    """``batch_size`` indices drawn uniformly, with replacement, from ``0..high-1``: int64 (B,).

    Drawing with replacement keeps every batch independent of the ones before it, so any number
    of batches can be drawn and one seed always gives the same sequence of batches."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
            "make one with np.random.default_rng(seed)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if high < 1:
        raise ValueError("cannot draw a batch from an empty split")
    return rng.integers(0, high, size=batch_size, dtype=np.int64)


def pick_split(splits: dict, split: str):
    """``splits[split]``, or a ValueError that lists the split names this dataset has."""
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)}, got {split!r}")
    return splits[split]


def load_text_file(path: str | Path) -> str:
    """The contents of a UTF-8 text file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"text file not found: {str(path)!r} (looked in {str(path.resolve().parent)!r})"
        ) from None


def stdlib_docs_text() -> str:
    """Python's own documentation: the help topics that ``help("assert")`` and friends print,
    mostly sections of the language reference (about 465 kB of English and code). Every CPython
    ships them as ``pydoc_data.topics``, so this corpus needs no download.

    Topics are concatenated in sorted-key order, so the text is identical on every run; it does
    change a little between Python versions, as the documentation is edited."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some Linux distributions package it separately
        raise RuntimeError(
            "this Python has no pydoc_data module; install your distribution's full standard "
            "library, or train on a text file of your own with load_text_file(path)"
        ) from err
    return "".join(topics[key] for key in sorted(topics))


class TextDataset:
    """A text encoded once, split into a training part and a validation part.

    The split is by position, not at random: the first ``1 - val_fraction`` of the token stream
    trains and the rest validates. Random windows from one stream would overlap between the two
    parts, and the validation loss would then measure memorisation rather than generalisation.

    Args:
        text: the whole corpus.
        tokenizer: a ``CharTokenizer``; by default one built from the characters of ``text``.
        val_fraction: share of the tokens kept for validation, in [0, 1).

    Attributes:
        tokenizer, train_tokens (N_train,) int64, val_tokens (N_val,) int64.
    """

    def __init__(self, text: str, tokenizer: CharTokenizer | None = None,
                 val_fraction: float = 0.1):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(text)
        tokens = self.tokenizer.encode(text)
        n_train = len(tokens) - int(round(len(tokens) * val_fraction))
        self.train_tokens = tokens[:n_train]
        self.val_tokens = tokens[n_train:]

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random windows of the ``"train"`` or ``"val"`` tokens.

        Returns:
            x: (batch_size, block_size) int64, the inputs.
            y: (batch_size, block_size) int64, the next token after each input position:
                ``y[:, t] == x[:, t + 1]`` and ``y[:, -1]`` is the token after the window.
        """
        tokens = pick_split({"train": self.train_tokens, "val": self.val_tokens}, split)
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if block_size + 1 > len(tokens):
            raise ValueError(
                f"block_size + 1 = {block_size + 1} tokens do not fit in the {split!r} split, "
                f"which has {len(tokens)} tokens; use a smaller block_size or more text"
            )
        # A window needs block_size + 1 tokens (inputs plus the one extra target), so the last
        # possible start is len - block_size - 1.
        starts = random_indices(rng, len(tokens) - block_size, batch_size)
        positions = starts[:, None] + np.arange(block_size)  # (B, block_size)
        return tokens[positions], tokens[positions + 1]
