"""Floor 8: what makes a comparison fair. A learning rate chosen per method on the validation
split, outcomes over several seeds reported as mean and spread, and "no difference" wherever two
methods' spreads overlap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Spread:
    """Mean of a few seeds' values, with their standard deviation and range (min-max)."""
    mean: float
    std: float
    min: float
    max: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.min:.3f}-{self.max:.3f}]"

    def overlaps(self, other: "Spread") -> bool:
        """True when the two min-max ranges overlap: the seeds cannot tell them apart."""
        return self.min <= other.max and other.min <= self.max


def aggregate(values) -> Spread:
    """Spread over seeds; the std is the population one (ddof=0): it describes these seeds."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("aggregate needs at least one value")
    return Spread(float(v.mean()), float(v.std()), float(v.min()), float(v.max()), int(v.size))


@dataclass
class LrChoice:
    grid: tuple
    scores: tuple           # the validation score of a short run at each rate (empty: fixed by hand)
    chosen: float

    def __str__(self) -> str:
        if not self.scores:
            return f"{self.chosen:g}, fixed (no grid run)"
        return ", ".join(f"{lr:g}{'*' if lr == self.chosen else ''}: {s:.3f}"
                         for lr, s in zip(self.grid, self.scores))


def choose_lr(grid, validation_score: Callable) -> LrChoice:
    """Score each learning rate with ``validation_score(lr)`` (higher is better: a short run,
    measured on the validation split only) and keep the best; a tie goes to the smaller rate."""
    grid = tuple(sorted(grid))
    if not grid:
        raise ValueError("the learning-rate grid is empty")
    scores = tuple(float(validation_score(lr)) for lr in grid)
    return LrChoice(grid, scores, grid[int(np.argmax(scores))])  # argmax keeps the first maximum


def steps_to_reach(history, key: str, threshold: float) -> int | None:
    """The first evaluated step whose ``key`` is >= threshold (None if never)."""
    return next((h["step"] for h in history if key in h and h[key] >= threshold), None)
