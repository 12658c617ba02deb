"""PSO-Merging over basis coefficients.

A position is a (G, K) array: for each of G tensor groups, K coefficients over the basis
(base, experts, DARE experts), each row summing to 1. Because r1 and r2 are scalars per
particle and group, every position, velocity and best stays such a combination of the
starting one-hot positions: the optimisation in coefficient space is exactly PSO over the
models' weights (see docs in README, "Why coefficient space is exact").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from psomerge.swarm.optimizer import SwarmOptimizer, SwarmSettings


class PSOSettings(SwarmSettings):
    """PSO-Merging's settings; the defaults are the paper's."""

    type: Literal["pso"] = "pso"
    inertia: float = 0.2  # w
    cognitive: float = 2.0  # c1
    social: float = 2.0  # c2
    velocity_clamp: float | None = Field(None, gt=0)  # max L2 norm of a group's velocity row
    bounds: tuple[float, float] | None = None  # coefficient bounds, applied with re-projection


def pso_velocity(x, v, pbest, gbest, r1, r2, w, c1, c2):
    """v' = w*v + c1*r1*(pbest - x) + c2*r2*(gbest - x). r1, r2 broadcast over coefficients."""
    return w * v + c1 * r1 * (pbest - x) + c2 * r2 * (gbest - x)


def clamp_velocity(v: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale each group's velocity row down to ``max_norm``; scaling keeps its zero sum."""
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v * np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))


def project_bounds(x: np.ndarray, lo: float, hi: float, iterations: int = 50) -> np.ndarray:
    """Clip to [lo, hi] while keeping each row's sum at 1 (alternating clip and even shift).

    Bounds are the one option that is a projection rather than pure PSO arithmetic; the
    result is still an affine combination of the basis, so materialisation stays exact.
    """
    for _ in range(iterations):
        x = np.clip(x, lo, hi)
        excess = x.sum(axis=-1, keepdims=True) - 1.0
        if np.all(np.abs(excess) < 1e-12):
            break
        free = ((x > lo) & (excess > 0)) | ((x < hi) & (excess < 0))
        n_free = np.maximum(free.sum(axis=-1, keepdims=True), 1)
        x = x - free * excess / n_free
    return x


class PSOMerging(SwarmOptimizer):
    """PSO-Merging: particles start one-hot at the basis models, v0 = 0; the final global best wins."""

    name = "pso"

    def __init__(self, k: int, groups: int, settings: PSOSettings = PSOSettings(), starts: Sequence[np.ndarray] = ()):
        super().__init__(k, groups, settings, starts)

    def _move(self):
        c = self.settings
        shape = (len(self.x), self.groups, 1)  # one r1, r2 per particle per group
        r1, r2 = self.rng.random(shape), self.rng.random(shape)
        v = pso_velocity(self.x, self.v, self.pbest, self.best_position[None], r1, r2,
                         c.inertia, c.cognitive, c.social)
        if c.velocity_clamp is not None:
            v = clamp_velocity(v, c.velocity_clamp)
        x = self.x + v
        if c.bounds is not None:
            x = project_bounds(x, *c.bounds)
        return x, v

    def done(self) -> bool:
        return self.step > self.settings.steps or self.over_budget()
