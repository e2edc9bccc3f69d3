"""Floor 2: the data a model learns from, as host-side NumPy int64 arrays.

* ``tokenizer`` – :class:`CharTokenizer`, text to ids and back.
* ``text`` – corpora (:func:`stdlib_docs_text`, :func:`load_text_file`) and :class:`TextDataset`,
  random windows for next-token pretraining.
* ``tasks`` – :class:`ArithmeticTask` and :class:`SumClassificationTask`, small fine-tuning tasks
  with exact answers, held-out validation and test splits, and :class:`SkillMixture` of several.
* ``vocab`` – :func:`text_tokenizer`, the one vocabulary of the real-text tasks (with a mask token).
* ``mlm`` – :func:`mask_tokens` (BERT's 15% / 80-10-10) and :class:`MaskedLMDataset`.
* ``ner`` – :class:`NERCorpus`, template sentences tagged BIO per character.
* ``translation`` – :class:`NumberTranslationTask`, English to French number words as SFT.
* ``doc_sections`` – :class:`DocSectionsTask`, which documentation section a paragraph is from.

Every random draw takes a ``numpy.random.Generator`` from the caller, so one seed gives the same
batches every run. The model code moves the arrays to the device.
"""
from .tasks import (
    ARITHMETIC_CHARS,
    IGNORE_INDEX,
    PAD_CHAR,
    ArithmeticTask,
    SkillMixture,
    SumClassificationTask,
)
from .doc_sections import DocSectionsTask
from .mlm import MaskedLMDataset, mask_tokens
from .ner import NERCorpus, bio_tags
from .text import TextDataset, load_text_file, stdlib_docs_text
from .tokenizer import CharTokenizer
from .translation import NumberTranslationTask, english_words, french_words
from .vocab import END_CHAR, MASK_CHAR, text_tokenizer

__all__ = [
    "ARITHMETIC_CHARS",
    "END_CHAR",
    "IGNORE_INDEX",
    "MASK_CHAR",
    "PAD_CHAR",
    "ArithmeticTask",
    "CharTokenizer",
    "DocSectionsTask",
    "MaskedLMDataset",
    "NERCorpus",
    "NumberTranslationTask",
    "SkillMixture",
    "SumClassificationTask",
    "TextDataset",
    "bio_tags",
    "english_words",
    "french_words",
    "load_text_file",
    "mask_tokens",
    "stdlib_docs_text",
    "text_tokenizer",
]
