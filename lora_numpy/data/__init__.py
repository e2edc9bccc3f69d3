"""Floor 2: the data a model learns from, as host-side NumPy int64 arrays.

* ``tokenizer`` – :class:`CharTokenizer`, text to ids and back.
* ``text`` – corpora (:func:`stdlib_docs_text`, :func:`load_text_file`) and :class:`TextDataset`,
  random windows for next-token pretraining.
* ``tasks`` – :class:`ArithmeticTask` and :class:`SumClassificationTask`, small fine-tuning tasks
  with exact answers, held-out validation and test splits, and :class:`SkillMixture` of several.

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
from .text import TextDataset, load_text_file, stdlib_docs_text
from .tokenizer import CharTokenizer

__all__ = [
    "ARITHMETIC_CHARS",
    "IGNORE_INDEX",
    "PAD_CHAR",
    "ArithmeticTask",
    "CharTokenizer",
    "SkillMixture",
    "SumClassificationTask",
    "TextDataset",
    "load_text_file",
    "stdlib_docs_text",
]
