"""Choosing the merged model: the search's best particles (and the best static merge it
started from) compete on the validation split, which the search never read.

With few examples, the particle with the highest search fitness is partly the luckiest on
that split; a second, independent split picks among the strongest candidates without that
bias, and the held-out split is left untouched for the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from psomerge.yamlconfig import StrictModel


class SelectionSettings(StrictModel):
    candidates: int = Field(4, ge=1)  # the search's best distinct particles scored on the validation split
    include_start: bool = True  # plus the best warm start (a static merge), so the choice is never worse on validation


def distinct_best(evaluated: Sequence[tuple[np.ndarray, float]], n: int, atol: float = 1e-6) -> list[int]:
    """Indices of the ``n`` best distinct positions of ``evaluated`` (position, fitness)."""
    order = sorted(range(len(evaluated)), key=lambda i: -evaluated[i][1])
    chosen: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        if not any(np.allclose(evaluated[i][0], evaluated[j][0], atol=atol) for j in chosen):
            chosen.append(i)
    return chosen


def choose(search_fitness: Sequence[float], validation_fitness: Sequence[float]) -> int:
    """The candidate with the best validation score; among equal ones, the best search fitness."""
    return max(range(len(search_fitness)), key=lambda i: (validation_fitness[i], search_fitness[i]))
