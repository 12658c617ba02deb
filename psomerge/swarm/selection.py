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
    # plus the best warm start (a static merge or an expert): the choice is never worse on validation
    include_start: bool = True
    # plus the mean of the candidates' coefficients (a point of the space, so exact): averaging good
    # nearby solutions, as model soups do, cancels part of what each fitted to the search split's noise
    soup: bool = True


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


def selection_candidates(evaluated: Sequence[tuple[np.ndarray, float]], starts: Sequence[np.ndarray],
                         settings: SelectionSettings) -> list[tuple[np.ndarray, float, str]]:
    """What competes on the validation split: (position, search fitness, origin) for the
    search's best distinct particles, their soup, and the best warm start. A soup has no search
    fitness of its own (it was not searched): it gets the lowest of its ingredients'."""
    picked = [(evaluated[i][0], evaluated[i][1], "search") for i in distinct_best(evaluated, settings.candidates)]
    if settings.soup and len(picked) > 1:
        picked.append((np.mean([p[0] for p in picked], axis=0), min(p[1] for p in picked), "soup"))
    if settings.include_start:
        at_starts = [(x, f) for x, f in evaluated if any(np.allclose(x, s) for s in starts)]
        if at_starts:
            x, f = max(at_starts, key=lambda e: e[1])
            if not any(np.allclose(x, p[0]) for p in picked):
                picked.append((x, f, "warm start"))
    return picked


def choose(search_fitness: Sequence[float], validation_fitness: Sequence[float]) -> int:
    """The candidate with the best validation score; among equal ones, the best search fitness."""
    return max(range(len(search_fitness)), key=lambda i: (validation_fitness[i], search_fitness[i]))
