"""Floor 2: masked language modelling, the pretraining task of an encoder (BERT's recipe).

A decoder learns by predicting the next token, which it can do because it never sees the
future. An encoder sees the whole sequence, so "predict the next token" would be trivial: the
answer is in its input. BERT (Devlin et al. 2019) hides tokens instead and asks for them back:

* choose 15% of the positions (each independently, ``mlm_probability``);
* of the chosen ones, replace 80% by the mask token, 10% by a random token, and leave 10%
  unchanged (so the model cannot learn that only ``█`` positions matter: at test time there is
  no mask, and every position's representation must be useful);
* the loss counts the chosen positions only: every other target is the ignore index -100.

This is what Hugging Face's ``DataCollatorForLanguageModeling`` does, with the same draws
(mask with probability 0.8, then random with probability 0.5 of the rest).
"""
from __future__ import annotations

import numpy as np

from .tasks import IGNORE_INDEX
from .text import pick_split, random_indices
from .tokenizer import CharTokenizer


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, mask_token_id: int, vocab_size: int,
                mlm_probability: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of a batch of token ids.

    Args:
        ids: (B, T) int64 token ids (left untouched).
        rng: the caller's generator; the same seed gives the same masks.
        mask_token_id: id of the mask token; vocab_size: random replacements are drawn from
            0..vocab_size-1, uniformly (as Hugging Face does).
        mlm_probability: the share of positions chosen.
    Returns:
        inputs (B, T): ids with the chosen positions masked / randomised / kept;
        labels (B, T): the original id at chosen positions, IGNORE_INDEX (-100) elsewhere.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary 0..{vocab_size - 1}")
    ids = np.asarray(ids)
    chosen = rng.random(ids.shape) < mlm_probability
    labels = np.where(chosen, ids, IGNORE_INDEX)
    masked = chosen & (rng.random(ids.shape) < 0.8)
    randomised = chosen & ~masked & (rng.random(ids.shape) < 0.5)  # half of the other 20%
    inputs = np.where(masked, mask_token_id, ids)
    inputs = np.where(randomised, rng.integers(0, vocab_size, size=ids.shape), inputs)
    return inputs.astype(np.int64), labels.astype(np.int64)


class MaskedLMDataset:
    """Random windows of a text, masked for MLM pretraining.

    The split is by position (the last ``val_fraction`` of the text validates), as in
    ``TextDataset``. ``tokenizer`` must have a ``mask_token`` that the text does not contain.

    Attributes: tokenizer, train_tokens (N_train,), val_tokens (N_val,) int64.
    """

    def __init__(self, text: str, tokenizer: CharTokenizer, val_fraction: float = 0.1,
                 mlm_probability: float = 0.15):
        if tokenizer.mask_token is None:
            raise ValueError("MLM needs a tokenizer with a mask_token, e.g. data.text_tokenizer()")
        if tokenizer.mask_token in text:
            raise ValueError(f"the text contains the mask token {tokenizer.mask_token!r}; "
                             "choose a mask character the text does not use")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.tokenizer, self.mlm_probability = tokenizer, mlm_probability
        tokens = tokenizer.encode(text)
        n_train = len(tokens) - int(round(len(tokens) * val_fraction))
        self.train_tokens, self.val_tokens = tokens[:n_train], tokens[n_train:]

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (B, block_size), labels (B, block_size)) as ``mask_tokens`` returns them."""
        tokens = pick_split({"train": self.train_tokens, "val": self.val_tokens}, split)
        if not 1 <= block_size <= len(tokens):
            raise ValueError(f"block_size must be in 1..{len(tokens)} for the {split!r} split, "
                             f"got {block_size}")
        starts = random_indices(rng, len(tokens) - block_size + 1, batch_size)
        windows = tokens[starts[:, None] + np.arange(block_size)]
        return mask_tokens(windows, rng, self.tokenizer.mask_token_id, self.tokenizer.vocab_size,
                           self.mlm_probability)
