"""Floor 2: translation as supervised fine-tuning: English number words to French ones.

A parallel corpus made by rules, rich enough to be a real mapping rather than a word-for-word
substitution. French counts in twenties above sixty and has spelling rules English lacks:

    71  seventy-one         soixante et onze        (60 + 11, with "et")
    80  eighty              quatre-vingts           (4 × 20, plural "s")
    97  ninety-seven        quatre-vingt-dix-sept   (4 × 20 + 10 + 7; no "s" when followed)
    200 two hundred         deux cents              ("cent" takes "s" when multiplied and last)
    201 two hundred one     deux cent un
    80000 eighty thousand   quatre-vingt mille      ("mille" is invariable, and the "s" of
    200000                  deux cent mille          vingts / cents drops before it)
    1000 one thousand       mille                   (never "un mille")

(Traditional spelling: hyphens join the words of a number below a hundred, except around
"et".) A training example is a prompt and a response:

    "seventy-one = " + "soixante et onze\\n"

and the loss counts the response only (the prompt is given, not predicted): its targets are
the ignore index -100. The response ends with END_CHAR, the stop token of greedy decoding.
"""
from __future__ import annotations

import numpy as np

from .tasks import IGNORE_INDEX
from .text import pick_split, random_indices
from .vocab import END_CHAR, encode_padded, text_tokenizer

MAX_VALUE = 999_999
SEPARATOR = " = "
_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_FR_ONES = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze "
            "quinze seize dix-sept dix-huit dix-neuf").split()
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def _check(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_VALUE:
        raise ValueError(f"numbers must be integers in 1..{MAX_VALUE}, got {n!r}")


def english_words(n: int) -> str:
    """1..999999 in American English words: 97 -> "ninety-seven", 1205 -> "one thousand two
    hundred five" (no "and")."""
    _check(n)

    def below_1000(m):
        hundreds, rest = divmod(m, 100)
        words = [f"{_EN_ONES[hundreds]} hundred"] if hundreds else []
        if rest >= 20:
            words.append(_EN_TENS[rest // 10] + (f"-{_EN_ONES[rest % 10]}" if rest % 10 else ""))
        elif rest:
            words.append(_EN_ONES[rest])
        return " ".join(words)

    thousands, rest = divmod(n, 1000)
    return " ".join(p for p in (f"{below_1000(thousands)} thousand" if thousands else "",
                                below_1000(rest)) if p)


def _fr_below_100(n: int, last: bool) -> str:
    """1..99; ``last``: nothing follows, so 80 is "quatre-vingts" (else "quatre-vingt")."""
    if n < 20:
        return _FR_ONES[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # 70-79 = 60 + 10..19, 90-99 = 80 + 10..19
        base = "soixante" if tens == 7 else "quatre-vingt"
        if n == 71:
            return "soixante et onze"
        return f"{base}-{_FR_ONES[10 + unit]}"
    if tens == 8:
        return f"quatre-vingt-{_FR_ONES[unit]}" if unit else ("quatre-vingts" if last else "quatre-vingt")
    if unit == 1:
        return f"{_FR_TENS[tens]} et un"
    return _FR_TENS[tens] + (f"-{_FR_ONES[unit]}" if unit else "")


def _fr_below_1000(n: int, last: bool) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _fr_below_100(rest, last)
    if hundreds == 1:
        head = "cent"
    else:
        head = f"{_FR_ONES[hundreds]} cent" + ("s" if rest == 0 and last else "")
    return head + (f" {_fr_below_100(rest, last)}" if rest else "")


def french_words(n: int) -> str:
    """1..999999 in French words, traditional spelling (see the module docstring)."""
    _check(n)
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:  # "mille" is invariable; before it "cents"/"vingts" lose their "s"
        words.append("mille" if thousands == 1 else f"{_fr_below_1000(thousands, last=False)} mille")
    if rest:
        words.append(_fr_below_1000(rest, last=True))
    return " ".join(words)


class NumberTranslationTask:
    """English number words -> French number words, as prompt + response.

    Numbers are drawn without replacement from 1..max_value and cut into disjoint splits, so a
    test number was never seen in training.

    Args:
        max_value: the largest number (at most 999999); n_train, n_val, n_test: examples per
            split (together at most max_value); seed: seeds the draw.

    Attributes:
        tokenizer (shared ``text_tokenizer()``), stop_id (id of END_CHAR), block_size (the padded
        width of prompt + response), numbers: {split: int64 array}.
    """

    def __init__(self, max_value: int = MAX_VALUE, n_train: int = 20000, n_val: int = 300,
                 n_test: int = 300, seed: int = 0):
        _check(max_value)
        if n_train + n_val + n_test > max_value:
            raise ValueError(f"{n_train + n_val + n_test} examples asked from only {max_value} numbers")
        self.max_value = max_value
        self.tokenizer = text_tokenizer()
        self.stop_id = int(self.tokenizer.encode(END_CHAR)[0])
        drawn = np.random.default_rng(seed).choice(max_value, n_train + n_val + n_test, replace=False) + 1
        self.numbers = {"train": drawn[:n_train], "val": drawn[n_train:n_train + n_val],
                        "test": drawn[n_train + n_val:]}
        longest = max(len(self.prompt(n)) + len(self.response(n)) for n in drawn)
        self.block_size = longest - 1  # inputs drop the last token

    @staticmethod
    def prompt(n: int) -> str:
        return english_words(int(n)) + SEPARATOR

    @staticmethod
    def response(n: int) -> str:
        return french_words(int(n)) + END_CHAR

    def get_batch(self, split: str, batch_size: int, rng: np.random.Generator,
                  response_only: bool = True) -> tuple:
        """Next-token training data for random examples of a split.

        Returns x (B, block_size) and y (B, block_size): ``y[:, t]`` is token t + 1 of
        prompt + response, -100 on padding and, with ``response_only`` (the right way), on every
        target that belongs to the prompt. ``response_only=False`` trains on the prompt too,
        the common mistake, kept to measure what it costs.
        """
        numbers = pick_split(self.numbers, split)
        chosen = numbers[random_indices(rng, len(numbers), batch_size)]
        return self.sequences(chosen, response_only)

    def sequences(self, numbers, response_only: bool = True) -> tuple:
        """(x, y) as in ``get_batch`` for the given numbers."""
        prompts = [self.prompt(n) for n in numbers]
        texts = [p + self.response(n) for p, n in zip(prompts, numbers)]
        ids, lengths = encode_padded(self.tokenizer, texts, self.block_size + 1)
        x, y = ids[:, :-1], ids[:, 1:].copy()
        positions = np.arange(self.block_size)
        y[positions[None, :] >= (lengths - 1)[:, None]] = IGNORE_INDEX  # padding after the stop
        if response_only:
            prompt_lens = np.array([len(p) for p in prompts])
            y[positions[None, :] < (prompt_lens - 1)[:, None]] = IGNORE_INDEX  # y[t] = token t+1
        return x, y

    def examples(self, split: str) -> tuple:
        """(prompt strings, reference response strings without the stop token) of a split."""
        numbers = pick_split(self.numbers, split)
        return [self.prompt(n) for n in numbers], [french_words(int(n)) for n in numbers]
