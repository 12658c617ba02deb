"""CMA-ES (the ``cma`` package) over basis coefficients."""

from __future__ import annotations

import base64
import pickle
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from psomerge.swarm.optimizer import Optimizer, OptimizerSettings


class CMAESSettings(OptimizerSettings):
    """CMA-ES. ``budget`` (fitness evaluations) defaults to what PSO-Merging spends with the
    same ``steps``, K x (steps + 1); ``popsize`` defaults to K, PSO's particle count."""

    type: Literal["cmaes"] = "cmaes"
    budget: int | None = Field(None, gt=0)
    popsize: int | None = Field(None, ge=2)
    sigma0: float = Field(0.3, gt=0)

    def resolved(self, k: int) -> "CMAESSettings":
        return self.model_copy(update={"popsize": self.popsize or k, "budget": self.budget or k * (self.steps + 1)})


class CMAES(Optimizer):
    """CMA-ES (the ``cma`` package) over coefficients, started at the uniform average.

    Free coefficients are sampled in R^(G*K) and projected onto the affine set (each row
    shifted to sum to 1), so a proposal is always a valid particle.
    """

    name = "cmaes"

    def __init__(self, k: int, groups: int, settings: CMAESSettings = CMAESSettings(),
                 starts: Sequence[np.ndarray] = ()):
        super().__init__(k, groups, settings.seed)
        self.settings = settings.resolved(k)
        self.starts = [np.asarray(x, dtype=np.float64) for x in starts]
        self.es = None if self.starts else self._strategy(np.full(groups * k, 1.0 / k))

    def _strategy(self, x0: np.ndarray):
        import cma

        config = self.settings
        opts = {"popsize": config.popsize, "seed": config.seed + 1, "verbose": -9,
                "randn": _SeededRandn(config.seed), "CMA_diagonal": False}
        return cma.CMAEvolutionStrategy(x0, config.sigma0, opts)

    def _project(self, flat: np.ndarray) -> np.ndarray:
        x = flat.reshape(self.groups, self.k)
        return x + (1.0 - x.sum(axis=1, keepdims=True)) / self.k

    def ask(self) -> list[np.ndarray]:
        if self.es is None:  # warm starts first: the search then starts at the best of them
            self._asked = list(self.starts)
            return self._asked
        # the last generation fills the budget exactly: a user who pays for 42 evaluations gets
        # 42, not the 32 that whole generations of 11 would fit after 10 warm starts
        self._raw = self.es.ask()[: self.settings.budget - self.evaluations]
        self._asked = [self._project(np.asarray(r)) for r in self._raw]
        return self._asked

    def targets(self) -> list[tuple[float, np.ndarray] | None]:
        """After the warm starts (each scored in full), a proposal that cannot beat the best so
        far may be raced: CMA-ES then ranks it by its raced estimate, unbiased for its full
        fitness, so the update is the same in expectation; one that could be a new best is
        always scored in full."""
        if self.es is None or self.best_position is None:
            return [None] * len(self._asked)
        return [(self.best_fitness, self.best_position)] * len(self._asked)

    def _tell(self, positions, fitness):
        if self.es is None:
            self.es = self._strategy(positions[int(np.argmax(fitness))].reshape(-1))
            return
        if len(self._raw) < self.settings.popsize:
            return  # a partial last generation: its particles count (the best, model selection), no update follows
        self.es.tell(self._raw, (-fitness).tolist())  # cma minimises

    def done(self) -> bool:
        return self.evaluations >= self.settings.budget

    def _extra_state(self):
        # CMA's covariance state has no JSON form; for G*K coefficients its pickle is a few KB
        cma_state = base64.b64encode(pickle.dumps(self.es)).decode() if self.es is not None else None
        return {"cma": cma_state, "config": self.settings.model_dump()}

    def _load_extra(self, state):
        self.es = pickle.loads(base64.b64decode(state["cma"])) if state["cma"] is not None else None


class _SeededRandn:
    """cma's sampler with its own seeded generator (not numpy's global one), so a run is
    reproducible and its state travels inside the pickled strategy."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rs.standard_normal(shape)
