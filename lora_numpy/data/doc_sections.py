"""Floor 2: text classification on real text: which part of Python's documentation a paragraph
of ``pydoc_data.topics`` comes from.

The help topics (``help("assert")``) are sections of the Language Reference and the Library
Reference, copied from CPython's ``Doc/`` tree. Each topic belongs to one source document, and
that document is the label:

    statements   reference/simple_stmts + compound_stmts ("The "assert" statement", ...)
    expressions  reference/expressions ("Binary arithmetic operations", "Calls", ...)
    lexical      reference/lexical_analysis ("Integer literals", "String and Bytes literals")
    data model   reference/datamodel ("Special method names", "The standard type hierarchy")
    execution    reference/executionmodel ("Naming and binding", "Exceptions")
    library      library/stdtypes, string, pdb ("String Methods", "Format String Syntax", ...)

No one wrote this text for a classifier, and the classes are as imbalanced as the manual is
(the data model chapter is long; the execution model is short). Topics overlap (``compound``
contains ``if``), so paragraphs are de-duplicated, and a paragraph that appears under two
labels is dropped rather than given either.
"""
from __future__ import annotations

import numpy as np

from .text import pick_split, random_indices
from .vocab import encode_padded, text_tokenizer

SECTION_TOPICS = {
    "statements": """assert assignment async augassign break class compound continue del else for
        function global if import nonlocal pass raise return try while with yield""",
    "expressions": """atom-identifiers atom-literals attribute-references await binary bitwise
        booleans calls comparisons conversions dict exprlists in lambda lists operator-summary power
        shifting slicings subscriptions unary""",
    "lexical": "floating id-classes identifiers imaginary integers numbers strings",
    "data model": """attribute-access callable-types context-managers customization numeric-types
        objects sequence-types specialnames types""",
    "execution": "dynamic-features exceptions execmodel naming",
    "library": """bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects
        debugger formatstrings specialattrs string-methods truth typesfunctions typesmapping
        typesmethods typesmodules typesseq typesseq-mutable""",
}
CLASS_NAMES = tuple(SECTION_TOPICS)
_UNDERLINE = set("*=-~^")  # the characters of a heading's underline (an empty line is one too)


def section_paragraphs(max_chars: int | None = None, min_chars: int = 40) -> list:
    """(paragraph, class id) pairs from the installed ``pydoc_data.topics``: paragraphs split
    at blank lines, whitespace collapsed to single spaces, heading underlines dropped, cut to
    ``max_chars`` (what the model will read), then duplicates kept once (dropped if they carry
    two labels), so no input appears in two splits. Topics the table above does not name (a
    newer Python may add some) are skipped."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise RuntimeError("this Python has no pydoc_data module; install the full standard library") from err
    labels: dict = {}
    for label, names in enumerate(SECTION_TOPICS.values()):
        for name in names.split():
            for block in topics.get(name, "").split("\n\n"):
                lines = [ln for ln in block.split("\n") if not set(ln.strip()) <= _UNDERLINE]
                text = " ".join(" ".join(lines).split())[:max_chars]
                if len(text) >= min_chars:
                    labels.setdefault(text, set()).add(label)
    return [(text, next(iter(ls))) for text, ls in sorted(labels.items()) if len(ls) == 1]


class DocSectionsTask:
    """Classify a paragraph (its first ``block_size`` characters) by documentation section.

    Args:
        block_size: characters read per paragraph (longer ones are cut, shorter ones padded).
        val_fraction, test_fraction: shares of the paragraphs held out (a random cut).
        seed: seeds the cut.

    Attributes:
        tokenizer, block_size, n_classes, class_names, texts: {split: [str]}.
    """

    def __init__(self, block_size: int = 96, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0):
        pairs = section_paragraphs(max_chars=block_size)
        self.tokenizer, self.block_size = text_tokenizer(), block_size
        self.class_names, self.n_classes = CLASS_NAMES, len(CLASS_NAMES)
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_val, n_test = int(len(pairs) * val_fraction), int(len(pairs) * test_fraction)
        cut = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        self.texts = {s: [pairs[i][0] for i in idx] for s, idx in cut.items()}
        self._arrays = {}
        for split, idx in cut.items():
            x, lengths = encode_padded(self.tokenizer, self.texts[split], block_size)
            self._arrays[split] = (x, lengths, np.array([pairs[i][1] for i in idx], dtype=np.int64))

    def class_counts(self, split: str = "train") -> np.ndarray:
        return np.bincount(pick_split(self._arrays, split)[2], minlength=self.n_classes)

    def class_weights(self, split: str = "train") -> np.ndarray:
        """Inverse-frequency weights n / (C · count_c) (scikit-learn's "balanced"): float32 (C,).
        Passed as ``class_weight`` to the classifier's loss, a rare class's mistakes cost more."""
        counts = self.class_counts(split)
        return (counts.sum() / (self.n_classes * np.maximum(counts, 1))).astype(np.float32)

    def get_batch(self, split: str, batch_size: int, rng: np.random.Generator) -> tuple:
        """(x (B, block_size) padded with END_CHAR, lengths (B,), labels (B,))."""
        x, lengths, labels = pick_split(self._arrays, split)
        rows = random_indices(rng, len(x), batch_size)
        return x[rows], lengths[rows], labels[rows]

    def examples(self, split: str) -> tuple:
        """The whole split as (x, lengths, labels)."""
        return tuple(a.copy() for a in pick_split(self._arrays, split))
