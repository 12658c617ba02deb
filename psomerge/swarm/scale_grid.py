"""Task arithmetic with a tuned scale: theta0 + lambda * sum_i (theta_i - theta0) on a grid of
lambdas, the best one wins. In the merging literature this is the baseline that most reliably
beats the base model; here it is a search at equal budget over one coefficient."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from psomerge.swarm.optimizer import Optimizer, OptimizerSettings
from psomerge.swarm.warm_start import task_arithmetic_position


def coarse_to_fine(n: int) -> list[int]:
    """The indices 0..n-1 in an order whose every prefix is spread evenly over the range (the
    van der Corput sequence, each value taken by the nearest index not yet taken): a grid
    stopped early is still a coarse grid."""
    order: list[int] = []
    taken: set[int] = set()
    i = 0
    while len(order) < n:
        u, f, j = 0.0, 0.5, i
        while j:
            u += f * (j & 1)
            j >>= 1
            f /= 2
        free = [k for k in range(n) if k not in taken]
        k = min(free, key=lambda k: abs(k / max(n - 1, 1) - u))
        order.append(k)
        taken.add(k)
        i += 1
    return order


class ScaleGridSettings(OptimizerSettings):
    """``budget`` grid points (default: K x (steps + 1), PSO-Merging's budget) evenly spaced
    over [low, high], visited coarse to fine."""

    type: Literal["ta_grid"] = "ta_grid"
    budget: int | None = Field(None, gt=0)
    low: float = 0.1
    high: float = 1.5

    @model_validator(mode="after")
    def _ordered(self) -> "ScaleGridSettings":
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class ScaleGrid(Optimizer):
    name = "ta_grid"

    def __init__(self, k: int, groups: int, settings: ScaleGridSettings = ScaleGridSettings(), *, n_experts: int):
        super().__init__(k, groups, settings.seed)
        self.settings = settings
        budget = settings.budget or k * (settings.steps + 1)
        grid = np.linspace(settings.low, settings.high, budget)
        self.scales = grid[coarse_to_fine(budget)]
        self.n_experts = n_experts

    def ask(self) -> list[np.ndarray]:
        # one round: the whole grid (its points are independent)
        self._asked = [task_arithmetic_position(self.k, self.groups, self.n_experts, s) for s in self.scales]
        return self._asked

    def _tell(self, positions, fitness):
        pass

    def done(self) -> bool:
        return self.step >= 1
