"""Floor 2: a character-level tokenizer.

A language model works on integers, not text. The simplest mapping gives every character its
own id: the vocabulary is a list of characters and a character's id is its position in it.
Character tokenizers make vocabularies tiny (tens of ids instead of the tens of thousands of a
subword tokenizer), which keeps the embedding and output layers of a small model small.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .. import backend

_UNKNOWN = -1  # marks a code point with no id in the lookup table (real ids are >= 0)


class CharTokenizer:
    """Maps characters to ids (``encode``) and back (``decode``).

    Args:
        chars: the vocabulary, a string or an iterable of single characters. Ids follow the given
            order; repeats are dropped (the first occurrence keeps its id).
        unk_token: optional character of the vocabulary that stands in for any character outside
            it. Without one, ``encode`` refuses unknown characters, which is the safer default: a
            silent substitution can hide a vocabulary built from the wrong text.
        mask_token: optional character of the vocabulary that masked-language-model pretraining
            puts in place of a hidden token (BERT's ``[MASK]``). It must not occur in the text,
            or the model could not tell a hidden token from a real one. Vocabularies without one
            are unchanged.
    """

    def __init__(self, chars: str | Iterable[str], unk_token: str | None = None,
                 mask_token: str | None = None):
        chars = list(dict.fromkeys(chars))  # dict keeps insertion order: a stable dedupe
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"the vocabulary must hold single characters, got {c!r}")
        if not chars:
            raise ValueError("the vocabulary is empty; give at least one character")
        self.chars = "".join(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        if unk_token is not None and unk_token not in self._stoi:
            raise ValueError(
                f"unk_token {unk_token!r} is not in the vocabulary; it must be one of its "
                "characters"
            )
        self.unk_token = unk_token
        if mask_token is not None and (mask_token not in self._stoi or mask_token == unk_token):
            raise ValueError(f"mask_token {mask_token!r} must be a character of the vocabulary "
                             f"other than unk_token {unk_token!r}")
        self.mask_token = mask_token

        # encode() looks ids up in a table indexed by Unicode code point, so a whole string is
        # translated by one NumPy gather instead of a Python loop over its characters.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._table = np.full(codes.max() + 1, _UNKNOWN, dtype=np.int64)
        self._table[codes] = np.arange(len(codes))
        self._codes = codes.astype(np.uint32)  # decode() runs the same trip backwards

    @classmethod
    def from_text(cls, text: str, unk_token: str | None = None) -> CharTokenizer:
        """The vocabulary of every character in ``text``, sorted (so it does not depend on the
        order the characters first appear in)."""
        return cls(sorted(set(text)), unk_token=unk_token)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def mask_token_id(self) -> int | None:
        return None if self.mask_token is None else self._stoi[self.mask_token]

    def encode(self, text: str) -> np.ndarray:
        """``text`` (a string of length T) -> ids, int64 array of shape (T,)."""
        # UTF-32 stores each character as one 4-byte code point, so the bytes read straight into
        # an array of code points. "surrogatepass" lets odd strings through to the unknown check.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        codes = codes.astype(np.int64)
        ids = np.full(len(codes), _UNKNOWN, dtype=np.int64)
        in_table = codes < len(self._table)
        ids[in_table] = self._table[codes[in_table]]

        unknown = ids == _UNKNOWN
        if unknown.any():
            if self.unk_token is None:
                pos = int(np.argmax(unknown))  # the first unknown character
                raise ValueError(
                    f"character {text[pos]!r} at position {pos} is not in the vocabulary; "
                    "add it to the vocabulary, or pass unk_token='?' to map unknown characters "
                    "to it"
                )
            ids[unknown] = self._stoi[self.unk_token]
        return ids

    def decode(self, ids) -> str:
        """ids, a 1-D sequence of ints of length T (list, NumPy or CuPy array) -> a string of
        length T."""
        ids = backend.to_numpy(ids)
        if ids.ndim != 1:
            raise ValueError(
                f"decode takes one sequence, shape (T,), got shape {ids.shape}; "
                "for a batch use [tokenizer.decode(row) for row in ids]"
            )
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(
                f"id {int(ids[pos])} at position {pos} is outside the vocabulary "
                f"(valid ids are 0..{self.vocab_size - 1})"
            )
        return self._codes[ids].tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        """A JSON-ready description; ``from_dict`` rebuilds an identical tokenizer from it."""
        return {"chars": self.chars, "unk_token": self.unk_token, "mask_token": self.mask_token}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"], unk_token=d.get("unk_token"), mask_token=d.get("mask_token"))

    def __repr__(self) -> str:
        mask = "" if self.mask_token is None else f", mask_token={self.mask_token!r}"
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk_token={self.unk_token!r}{mask})"
