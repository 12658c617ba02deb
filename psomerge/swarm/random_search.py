"""Random search: the baseline any search must beat at equal budget. Particles are drawn
uniformly from the simplex of the basis members (Dirichlet(1), per tensor group), after the
warm starts; the best one wins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from psomerge.swarm.optimizer import Optimizer, OptimizerSettings


class RandomSearchSettings(OptimizerSettings):
    """``budget`` defaults to PSO-Merging's at the same ``steps``: K x (steps + 1)."""

    type: Literal["random"] = "random"
    budget: int | None = Field(None, gt=0)
    batch: int | None = Field(None, gt=0)  # particles per round (default K)


class RandomSearch(Optimizer):
    name = "random"

    def __init__(self, k: int, groups: int, settings: RandomSearchSettings = RandomSearchSettings(),
                 starts: Sequence[np.ndarray] = ()):
        super().__init__(k, groups, settings.seed)
        self.settings = settings
        self.batch = settings.batch or k
        self.budget = settings.budget or k * (settings.steps + 1)
        self.starts = [np.asarray(x, dtype=np.float64) for x in starts]

    def ask(self) -> list[np.ndarray]:
        if self.step == 0 and self.starts:
            self._asked = list(self.starts)[: self.budget]
        else:
            n = min(self.batch, self.budget - self.evaluations)
            self._asked = list(self.rng.dirichlet(np.ones(self.k), size=(n, self.groups)))
        return self._asked

    def targets(self) -> list[tuple[float, np.ndarray] | None]:
        """A sample matters only if it beats the best so far."""
        if self.best_position is None:
            return [None] * len(self._asked)
        return [(self.best_fitness, self.best_position)] * len(self._asked)

    def _tell(self, positions, fitness):
        pass

    def done(self) -> bool:
        return self.evaluations >= self.budget
