"""Model Swarms (Feng et al., 2024) in coefficient space: PSO with a repelling global worst,
a decaying step length and patience restarts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from psomerge.swarm.optimizer import SwarmOptimizer, SwarmSettings, from_json, to_json


class ModelSwarmsSettings(SwarmSettings):
    type: Literal["model_swarms"] = "model_swarms"
    step_length: float = Field(1.0, gt=0)  # lambda, decays by `decay` each step down to `min_step_length`
    decay: float = Field(0.95, gt=0, le=1)
    min_step_length: float = Field(0.1, gt=0)
    patience: int = Field(3, ge=1)  # steps without a personal-best gain before a particle restarts at it
    early_stop: int = Field(5, ge=1)  # steps without a global-best gain before the search stops


class ModelSwarms(SwarmOptimizer):
    """Model Swarms (Feng et al., 2024) in coefficient space.

    v <- (phi_v r_v v + phi_p r_p (pbest - x) + phi_g r_g (gbest - x) - phi_w r_w (gworst - x)) / sum(phi)
    x <- x + lambda v. The phi weights are drawn per particle once and normalised; every term
    is a difference of affine positions, so positions stay affine (rows sum to 1).
    """

    name = "model_swarms"

    def __init__(self, k: int, groups: int, settings: ModelSwarmsSettings = ModelSwarmsSettings(),
                 starts: Sequence[np.ndarray] = ()):
        super().__init__(k, groups, settings, starts)
        n = len(self.x)
        phi = self.rng.random((n, 4))
        self.phi = phi / phi.sum(axis=1, keepdims=True)
        self.stale = np.zeros(n, dtype=np.int64)
        self.fitness = np.full(n, -np.inf)
        self.lam = settings.step_length
        self.global_stale = 0

    def _move(self):
        n = len(self.x)
        r = self.rng.random((4, n, self.groups, 1))
        worst = self.x[int(np.argmin(self.fitness))][None]
        phi = [self.phi[:, i].reshape(n, 1, 1) for i in range(4)]
        v = (phi[0] * r[0] * self.v + phi[1] * r[1] * (self.pbest - self.x)
             + phi[2] * r[2] * (self.best_position[None] - self.x) - phi[3] * r[3] * (worst - self.x))
        x = self.x + self.lam * v
        restart = self.stale >= self.settings.patience
        x[restart], v[restart] = self.pbest[restart], 0.0
        self.stale[restart] = 0
        return x, v

    def _tell(self, positions, fitness):
        better = super()._tell(positions, fitness)
        self.fitness = fitness
        self.stale = np.where(better, 0, self.stale + 1)
        prev = self.history[-1]["best"] if self.history else -np.inf
        self.global_stale = 0 if self.best_fitness > prev else self.global_stale + 1
        if self.step > 0:
            self.lam = max(self.lam * self.settings.decay, self.settings.min_step_length)

    def done(self) -> bool:
        return self.step > self.settings.steps or self.global_stale >= self.settings.early_stop or self.over_budget()

    def _extra_state(self):
        return {**super()._extra_state(), "phi": to_json(self.phi), "fitness": to_json(self.fitness),
                "stale": self.stale.tolist(), "lam": self.lam, "global_stale": self.global_stale}

    def _load_extra(self, state):
        super()._load_extra(state)
        self.phi, self.fitness = from_json(state["phi"]), from_json(state["fitness"])
        self.stale = np.asarray(state["stale"], dtype=np.int64)
        self.lam, self.global_stale = state["lam"], state["global_stale"]
