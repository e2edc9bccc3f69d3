"""Floor 8: what makes a comparison fair, and its verdicts robust.

* The base is part of the experiment: run k pretrains base k and fine-tunes it with seed k, so
  every spread covers both the base's randomness and the fine-tuning's.
* Each method's learning rate is chosen on the validation split, from full-length runs of every
  grid value on every base: a rate is scored by its mean over the bases, all scores are shown,
  and a choice next to a rate that failed is flagged as an edge.
* Methods share bases and seeds, so they are compared pair by pair: "A higher" only when A - B
  has one sign on every pair and clears a stated noise floor on each; else "no difference".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Spread:
    """Mean of a few runs' values, with their standard deviation and range (min-max)."""
    mean: float
    std: float
    min: float
    max: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.min:.3f}-{self.max:.3f}]"


def aggregate(values) -> Spread:
    """Spread over runs; the std is the population one (ddof=0): it describes these runs."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("aggregate needs at least one value")
    return Spread(float(v.mean()), float(v.std()), float(v.min()), float(v.max()), int(v.size))


@dataclass
class LrChoice:
    """A method's learning rate: every grid value's validation score on every base, the choice
    (the best mean; a tie goes to the smaller rate) and, if it sits on an edge, why."""
    grid: tuple
    scores: tuple           # per rate, the validation scores of its runs, one per base (empty: fixed)
    chosen: float
    failed: tuple = ()      # per rate above the chosen, on how many bases it failed (FAIL_FRACTION)
    edge: str = ""          # "" or why the choice sits on an edge of what the grid can tell

    def __str__(self) -> str:
        if not self.scores:
            return f"{self.chosen:g}, fixed (no grid run)"
        return ", ".join(f"{lr:g}{'*' if lr == self.chosen else ''}: {aggregate(s)}"
                         for lr, s in zip(self.grid, self.scores))


# A rate above the chosen one fails on a base when its validation score there is under this
# fraction of the best score any rate of the grid reached on that base: training fell apart (a
# run whose loss became NaN scores 0). Too fast a rate rarely ends in NaN here: it knocks the model out of what it knew
# and its loss stalls high (measured, 400 steps: 1.3 to 2.1 where a good rate ends near 0.1),
# still below where it started on the new skill, so the loss alone cannot tell; the score can.
FAIL_FRACTION = 0.5


def choose_lr(grid, validation_scores: Callable) -> LrChoice:
    """Score each rate with ``validation_scores(lr)`` (one score per base, in the same order for
    every rate, higher is better, the validation split only) and keep the best mean; a tie goes to
    the smaller rate. The choice is an edge when it is the grid's largest or smallest (a rate
    beyond it might score higher) or when the next larger rate failed on some base: the choice
    then sits next to instability, where another base or machine may tip it over."""
    grid = tuple(sorted(grid))
    if not grid:
        raise ValueError("the learning-rate grid is empty")
    scores = tuple(tuple(float(v) for v in validation_scores(lr)) for lr in grid)
    best = int(np.argmax([np.mean(s) for s in scores]))  # argmax keeps the first maximum
    floor = FAIL_FRACTION * np.max(scores, axis=0)  # per base; a slower rate is behind, not failing
    failed = tuple(int(np.sum(np.asarray(s) < floor)) if i > best else 0 for i, s in enumerate(scores))
    edge = ""
    if len(grid) > 1 and best == len(grid) - 1:
        edge = "the grid's largest rate: a larger one might score higher"
    elif len(grid) > 1 and best == 0:
        edge = "the grid's smallest rate: a smaller one might score higher"
    if best + 1 < len(grid) and failed[best + 1]:
        edge = (f"next to a failing rate: {grid[best + 1]:g} failed on {failed[best + 1]} of "
                f"{len(scores[best + 1])} bases")
    return LrChoice(grid, scores, grid[best], failed, edge)


def steps_to_reach(history, key: str, threshold: float) -> int | None:
    """The first evaluated step whose ``key`` is >= threshold (None if never)."""
    return next((h["step"] for h in history if key in h and h[key] >= threshold), None)


@dataclass
class Verdict:
    """One outcome of two methods, compared over their shared (base, seed) pairs."""
    outcome: str
    a: str
    b: str
    differences: tuple      # a - b per pair
    floor: float
    more: str = "higher"    # the word for a larger value ("slower" for steps to a threshold)
    digits: int = 3         # of the differences printed

    @property
    def word(self) -> str:
        """"a higher" / "b higher" / "no difference", by the rule of the module's docstring."""
        d = np.asarray(self.differences)
        if np.all(d > self.floor):
            return f"{self.a} {self.more}"
        if np.all(d < -self.floor):
            return f"{self.b} {self.more}"
        return "no difference"

    def __str__(self) -> str:
        d = self.differences
        return (f"{self.outcome:>13}: {self.a} vs {self.b}: {self.word} "
                f"({self.a} - {self.b} per pair: {', '.join(f'{v:+.{self.digits}f}' for v in d)})")


def paired_verdict(outcome: str, a: str, b: str, values_a, values_b, floor: float,
                   more: str = "higher", digits: int = 3) -> Verdict:
    """``values_a[k]`` and ``values_b[k]`` come from the same pair k (same base, same seed)."""
    if len(values_a) != len(values_b) or not len(values_a):
        raise ValueError(f"paired values need one per pair on both sides, got {len(values_a)} and {len(values_b)}")
    return Verdict(outcome, a, b, tuple(float(x - y) for x, y in zip(values_a, values_b)), floor, more, digits)
