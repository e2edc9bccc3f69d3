"""Floor 2: small supervised tasks with exact answers, for fine-tuning experiments.

Both tasks write problems about two operands in one fixed vocabulary, ``ARITHMETIC_CHARS``, so a
single base model (one embedding table, one output layer) can be adapted to any of them:

* :class:`ArithmeticTask` – generate the answer: ``"07+35="`` -> ``"042"``.
* :class:`SumClassificationTask` – classify the input: ``"07+35"`` -> which range holds the sum.

Every operand pair is enumerated, shuffled with the task's own seed and split into train, validation
(optional) and test once, so a test problem is never seen in training or used for a choice, and any
answer can be checked exactly. :class:`SkillMixture` draws batches from several arithmetic tasks at
once: a base model pretrained on it must read the operator to know which skill a prompt asks for.
"""
from __future__ import annotations

import operator

import numpy as np

from .text import pick_split, random_indices
from .tokenizer import CharTokenizer

ARITHMETIC_CHARS = "0123456789+-*= |"  # "|" came last, so older ids did not move
PAD_CHAR = " "  # pads short sequences; no problem text contains it, so it is never ambiguous
IGNORE_INDEX = -100  # a target the loss skips (the value PyTorch's cross-entropy uses too)
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "|": lambda a, b: abs(a - b)}  # | : |a-b|
MAX_DIGITS = 3  # 10**(2 * 3) = one million operand pairs; one more digit would be 100 million


def _check_n_digits(n_digits: int) -> None:
    if not isinstance(n_digits, (int, np.integer)) or not 1 <= n_digits <= MAX_DIGITS:
        raise ValueError(
            f"n_digits must be between 1 and {MAX_DIGITS}, got {n_digits}; "
            f"n digits per operand give 10**(2n) problems"
        )


def _all_pairs(n_digits: int) -> np.ndarray:
    """Every operand pair (a, b) with n_digits-digit operands: int64 (10**(2n), 2)."""
    a, b = np.meshgrid(np.arange(10**n_digits), np.arange(10**n_digits), indexing="ij")
    return np.stack([a.ravel(), b.ravel()], axis=1)


def _split_pairs(pairs: np.ndarray, test_fraction: float, seed: int, val_fraction: float = 0.0,
                 max_train: int | None = None) -> dict:
    """Shuffle the rows of ``pairs`` (N, 2) and cut them into {"train", "val", "test"} ("val" only
    when ``val_fraction`` > 0). The test rows come first in the shuffled order and validation next,
    so adding a validation split takes it from training and leaves the test set unchanged.
    ``max_train`` keeps only that many training rows (a low-data variant of the same task).

    The task owns this Generator (not the caller's batch Generator), so the split depends on
    ``seed`` alone and stays the same however many batches are drawn afterwards."""
    if not (0.0 <= test_fraction and 0.0 <= val_fraction and test_fraction + val_fraction < 1.0):
        raise ValueError(f"test_fraction and val_fraction must be >= 0 with a sum below 1, "
                         f"got {test_fraction} and {val_fraction}")
    if max_train is not None and max_train < 1:
        raise ValueError(f"max_train must be a positive number of examples or None, got {max_train}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_test, n_val = int(round(len(pairs) * test_fraction)), int(round(len(pairs) * val_fraction))
    splits = {"train": pairs[order[n_test + n_val:]][:max_train], "test": pairs[order[:n_test]]}
    if val_fraction > 0:
        splits["val"] = pairs[order[n_test:n_test + n_val]]
    return splits


def _operands_text(a: int, b: int, op: str, n_digits: int) -> str:
    """``"07+35"``: both operands zero-padded to n_digits, so every problem has the same width
    and a digit's position alone tells the model its place value."""
    for name, value in (("a", a), ("b", b)):
        if not 0 <= value < 10**n_digits:
            raise ValueError(f"operand {name}={value} does not have {n_digits} digit(s)")
    return f"{a:0{n_digits}d}{op}{b:0{n_digits}d}"


class _OperandPairTask:
    """What both tasks share: problems about operand pairs (a, b), split once into train and
    test, written in the ``ARITHMETIC_CHARS`` vocabulary. Subclasses define ``format`` and
    ``seq_len``."""

    def __init__(self, pairs: np.ndarray, n_digits: int, test_fraction: float, seed: int,
                 val_fraction: float = 0.0, max_train: int | None = None):
        self.n_digits = n_digits
        self.tokenizer = CharTokenizer(ARITHMETIC_CHARS)
        self._splits = _split_pairs(pairs, test_fraction, seed, val_fraction, max_train)

    def operands(self, split: str) -> np.ndarray:
        """The (a, b) pairs of a split ("train", "test", or "val" if it has one): int64 (N, 2)."""
        return pick_split(self._splits, split).copy()

    def _encode(self, pairs: np.ndarray) -> np.ndarray:
        """Operand pairs (N, 2) -> token ids of their problem texts (N, seq_len)."""
        text = "".join(self.format(a, b) for a, b in pairs.tolist())
        return self.tokenizer.encode(text).reshape(len(pairs), self.seq_len)


class ArithmeticTask(_OperandPairTask):
    """Answer ``a op b`` exactly, e.g. for ``op="+"``, ``n_digits=2``: ``"07+35=042"``.

    The answer has a fixed width too: enough digits for the largest result of the operation
    (for 2-digit operands: 3 for "+", 2 for "-" and "|", 4 for "*"). For "-", only pairs with
    a >= b are used, so results are never negative; "|" is the distance ``|a - b|``, any pair.

    ``reverse_answer=True`` writes the answer digits backwards (``"07+35=240"``). A model emits
    the answer left to right, but addition works right to left: each digit needs the carry from
    the digit on its right. Reversed, the least significant digit comes first, so each carry is
    already known when the next digit is written. Small transformers learn addition much faster
    this way (Lee et al., 2023, "Teaching Arithmetic to Small Transformers").

    Args:
        op: "+", "-", "*" or "|".
        n_digits: digits per operand, 1 to 3 (10**(2 * n_digits) problems).
        test_fraction: share of the problems held out for testing, in [0, 1).
        seed: seeds the train/val/test split.
        reverse_answer: write answers least significant digit first.
        val_fraction: share held out for validation (choices such as the learning rate), or 0.
        max_train: keep only this many training problems (None: all).

    Attributes:
        tokenizer: ``CharTokenizer`` over ``ARITHMETIC_CHARS``.
        prompt_len: tokens up to and including "=" (2 * n_digits + 2).
        answer_len: tokens of the answer.
        seq_len: prompt_len + answer_len.
    """

    def __init__(self, op: str = "+", n_digits: int = 2, test_fraction: float = 0.1,
                 seed: int = 0, reverse_answer: bool = False, val_fraction: float = 0.0,
                 max_train: int | None = None):
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        _check_n_digits(n_digits)
        self.op, self.reverse_answer = op, reverse_answer
        pairs = _all_pairs(n_digits)
        if op == "-":
            pairs = pairs[pairs[:, 0] >= pairs[:, 1]]
        super().__init__(pairs, n_digits, test_fraction, seed, val_fraction, max_train)

        largest = 10**n_digits - 1
        # every op here peaks at a corner of the operand square ("-" only where a >= b)
        largest_result = max(OPS[op](a, b) for a in (0, largest) for b in (0, largest)
                             if op != "-" or a >= b)
        self.prompt_len = 2 * n_digits + 2
        self.answer_len = len(str(largest_result))
        self.seq_len = self.prompt_len + self.answer_len

    def format(self, a: int, b: int) -> str:
        """The full problem text, prompt and answer: ``format(7, 35) == "07+35=042"``.
        The prompt alone, to generate from, is ``format(a, b)[:prompt_len]``."""
        a, b = int(a), int(b)
        if self.op == "-" and a < b:
            raise ValueError(f"for '-' the task needs a >= b, got a={a}, b={b}")
        answer = f"{OPS[self.op](a, b):0{self.answer_len}d}"
        if self.reverse_answer:
            answer = answer[::-1]
        return _operands_text(a, b, self.op, self.n_digits) + "=" + answer

    def decode_answer(self, ids) -> int:
        """Answer ids, shape (answer_len,), back to the number they spell (undoing the reversal).
        Raises ValueError if they do not spell a number, e.g. a model's wrong guess "4+2"."""
        text = self.tokenizer.decode(ids)
        digits = text[::-1] if self.reverse_answer else text
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"answer {text!r} is not a number")
        return int(digits)

    def get_batch(self, split: str, batch_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random problems of a split as next-token training data.

        Returns:
            x: (batch_size, seq_len - 1) int64, the problem without its last token.
            y: (batch_size, seq_len - 1) int64, the next token at every position, except that
                targets inside the prompt are ``IGNORE_INDEX``: the prompt is given, not
                predicted (its operands are random), so only the answer_len answer tokens count.
        """
        pairs = pick_split(self._splits, split)
        seqs = self._encode(pairs[random_indices(rng, len(pairs), batch_size)])
        x, y = seqs[:, :-1], seqs[:, 1:].copy()
        # y[:, t] is token t + 1, which belongs to the prompt while t + 1 < prompt_len.
        y[:, : self.prompt_len - 1] = IGNORE_INDEX
        return x, y

    def examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Every problem of a split, for exact-match evaluation.

        Returns:
            prompts: (N, prompt_len) int64, e.g. "07+35=".
            answers: (N, answer_len) int64, e.g. "042".
        """
        seqs = self._encode(pick_split(self._splits, split))
        return seqs[:, : self.prompt_len], seqs[:, self.prompt_len :]


class SumClassificationTask(_OperandPairTask):
    """Classify ``"a+b"`` by the range its sum falls in: a sequence classification task.

    With the defaults (2-digit operands, ``boundaries=(66, 133)``) class 0 is sum < 66, class 1
    is 66 <= sum < 133 and class 2 is sum >= 133. The sum of two uniform numbers is not uniform
    (it is triangular: there is one way to make 0, a hundred ways to make 99), so the classes are
    imbalanced by nature. Over all 10 000 pairs the defaults give

        class 0: 2211 pairs (22.1%), class 1: 5578 (55.8%), class 2: 2211 (22.1%),

    so always answering "class 1" already scores about 56% accuracy: compare against that, and
    look at per-class recall (``metrics.classification_report``), not accuracy alone.

    Args:
        n_digits: digits per operand, 1 to 3.
        boundaries: increasing sums where a new class starts; ``len(boundaries) + 1`` classes.
            The defaults suit 2-digit operands; scale them with ``n_digits``.
        test_fraction: share of the pairs held out for testing, in [0, 1).
        seed: seeds the train/test split.

    Attributes:
        tokenizer: ``CharTokenizer`` over ``ARITHMETIC_CHARS``.
        seq_len: tokens per input (2 * n_digits + 1).
        pad_id: id of ``PAD_CHAR``, which fills rows after their ``lengths``.
        n_classes, class_names: e.g. ["sum<66", "66<=sum<133", "sum>=133"].
    """

    def __init__(self, n_digits: int = 2, boundaries: tuple[int, ...] = (66, 133),
                 test_fraction: float = 0.2, seed: int = 0, val_fraction: float = 0.0,
                 max_train: int | None = None):
        _check_n_digits(n_digits)
        self.boundaries = tuple(int(x) for x in boundaries)
        max_sum = 2 * (10**n_digits - 1)
        cuts = (0, *self.boundaries, max_sum + 1)
        if not self.boundaries or any(lo >= hi for lo, hi in zip(cuts, cuts[1:])):
            # Each class needs at least one reachable sum, or it could never be learned.
            raise ValueError(
                f"boundaries must be strictly increasing sums in 1..{max_sum} "
                f"(the largest sum of two {n_digits}-digit numbers), got {boundaries}"
            )
        super().__init__(_all_pairs(n_digits), n_digits, test_fraction, seed, val_fraction, max_train)
        self.pad_id = int(self.tokenizer.encode(PAD_CHAR)[0])
        self.seq_len = 2 * n_digits + 1
        self.n_classes = len(self.boundaries) + 1
        self.class_names = (
            [f"sum<{self.boundaries[0]}"]
            + [f"{lo}<=sum<{hi}" for lo, hi in zip(self.boundaries, self.boundaries[1:])]
            + [f"sum>={self.boundaries[-1]}"]
        )

    def format(self, a: int, b: int) -> str:
        """The input text: ``format(7, 35) == "07+35"``."""
        return _operands_text(int(a), int(b), "+", self.n_digits)

    def label(self, a: int, b: int) -> int:
        """The class of ``a + b``."""
        return int(self._labels(np.array([[a, b]]))[0])

    def _labels(self, pairs: np.ndarray) -> np.ndarray:
        """Operand pairs (N, 2) -> classes (N,) int64: how many boundaries the sum reaches."""
        return np.searchsorted(self.boundaries, pairs.sum(axis=1), side="right").astype(np.int64)

    def class_counts(self, split: str) -> np.ndarray:
        """How many examples of each class a split holds: int64 (n_classes,)."""
        labels = self._labels(pick_split(self._splits, split))
        return np.bincount(labels, minlength=self.n_classes).astype(np.int64)

    def _inputs(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Operand pairs (N, 2) -> (x, lengths, labels) as documented in ``get_batch``."""
        x = self._encode(pairs)
        # Every input has the same width here, so no row is padded; a model that reads only the
        # first lengths[i] tokens of row i also works on tasks whose inputs vary in length.
        lengths = np.full(len(pairs), self.seq_len, dtype=np.int64)
        return x, lengths, self._labels(pairs)

    def get_batch(self, split: str, batch_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random inputs of a split with their classes.

        Returns:
            x: (batch_size, seq_len) int64 token ids, right-padded with ``pad_id``.
            lengths: (batch_size,) int64, the number of real (non-pad) tokens in each row.
            labels: (batch_size,) int64 in 0..n_classes-1.
        """
        pairs = pick_split(self._splits, split)
        return self._inputs(pairs[random_indices(rng, len(pairs), batch_size)])

    def examples(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole split as ``(x, lengths, labels)``, shapes as in ``get_batch`` with N rows."""
        return self._inputs(pick_split(self._splits, split))


class SkillMixture:
    """Several arithmetic skills in one stream of batches, e.g. "+" and "-": each row of a batch
    is a problem of a skill drawn uniformly, so a model trained on it must read the operator to
    know what to answer. Shorter problems are right-padded with ``PAD_CHAR`` whose targets are
    ``IGNORE_INDEX``, so padding is never learned.

    Args:
        tasks: ArithmeticTasks in one vocabulary, keyed by a skill name, e.g. {"add": ..., "sub": ...}.

    Attributes:
        tasks: the same dict; evaluate each skill on its own split with ``tasks[name]``.
        tokenizer: the shared ``CharTokenizer``.
        seq_len: the longest problem's length (the model's block size must hold it).
    """

    def __init__(self, tasks: dict):
        if len(tasks) < 2:
            raise ValueError(f"a mixture needs at least two skills, got {list(tasks)}")
        vocabularies = {t.tokenizer.chars for t in tasks.values()}
        if len(vocabularies) != 1:
            raise ValueError(f"the skills {list(tasks)} do not share one vocabulary: {vocabularies}")
        self.tasks = dict(tasks)
        self.tokenizer = next(iter(tasks.values())).tokenizer
        self.seq_len = max(t.seq_len for t in tasks.values())
        self.pad_id = int(self.tokenizer.encode(PAD_CHAR)[0])

    def get_batch(self, split: str, batch_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both (batch_size, seq_len - 1) int64, as ``ArithmeticTask.get_batch`` but with
        rows of every skill (grouped by skill; the rows' order does not matter to the loss)."""
        skill = rng.integers(0, len(self.tasks), batch_size)
        xs, ys = [], []
        for k, task in enumerate(self.tasks.values()):
            x, y = task.get_batch(split, int((skill == k).sum()), rng)
            width = ((0, 0), (0, self.seq_len - task.seq_len))
            xs.append(np.pad(x, width, constant_values=self.pad_id))
            ys.append(np.pad(y, width, constant_values=IGNORE_INDEX))
        return np.concatenate(xs), np.concatenate(ys)
