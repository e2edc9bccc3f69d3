"""Floor 2: the one character vocabulary that every real-text task shares.

Pretraining (causal or masked) and the fine-tuning tasks (NER, translation, documentation
sections) must use the same ids, or a fine-tuned copy of a base model would read a different
alphabet than the one it was pretrained on. The vocabulary is printable ASCII, the few other
characters of the standard library's documentation, two special characters, and nothing else:

* ``END_CHAR`` ("\\n") ends a text (the stop token of a generated answer) and fills rows after
  their end, as GPT-2 uses its end-of-text token for padding. No task text contains it.
* ``MASK_CHAR`` ("█") stands in for a hidden character in masked-language-model pretraining
  (BERT's ``[MASK]``); no text contains it either.

Any other character becomes ``UNK_CHAR`` ("?"), so text from a newer Python's documentation
still encodes.
"""
from __future__ import annotations

import numpy as np

from .tokenizer import CharTokenizer

END_CHAR = "\n"
MASK_CHAR = "\u2588"
UNK_CHAR = "?"
TEXT_CHARS = END_CHAR + "".join(chr(c) for c in range(32, 127)) + "°ß–—‘’“”…" + MASK_CHAR


def text_tokenizer() -> CharTokenizer:
    """The shared tokenizer: ``TEXT_CHARS`` (106 ids), ``?`` for unknown characters, ``█`` as mask."""
    return CharTokenizer(TEXT_CHARS, unk_token=UNK_CHAR, mask_token=MASK_CHAR)


def encode_padded(tokenizer: CharTokenizer, texts: list, length: int):
    """Texts -> (ids (N, length) int64 right-padded with END_CHAR, lengths (N,) int64).

    A text longer than ``length`` is an error (the caller chose the length from its data)."""

    too_long = [t for t in texts if len(t) > length]
    if too_long:
        raise ValueError(f"{len(too_long)} text(s) exceed length {length}, e.g. {too_long[0]!r}; "
                         "raise the length (block_size) or shorten the texts")
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    ids = tokenizer.encode("".join(t.ljust(length, END_CHAR) for t in texts))
    return ids.reshape(len(texts), length), lengths
