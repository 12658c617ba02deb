"""The ask/tell interface every optimiser over basis coefficients implements, and the
particle-swarm base shared by PSO-Merging and Model Swarms.

Every optimiser proposes (G, K) coefficient matrices whose rows sum to 1 and is told their
fitness. Its whole state, RNG included, is a small JSON-able dict, saved after every step:
a run resumed from the last checkpoint asks for exactly the particles an uninterrupted run
would have asked for (those scored before a crash come back from the fitness cache).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from psomerge.yamlconfig import StrictModel


class OptimizerSettings(StrictModel):
    """What every optimiser has: a seed and a number of steps (rounds of ask/tell)."""

    steps: int = Field(5, ge=0)
    seed: int = 0


class SwarmSettings(OptimizerSettings):
    extra_particles: int = Field(0, ge=0)  # Dirichlet-random starts beside the K one-hot ones
    # fitness evaluations: stop before a step that would exceed it (searches compared at equal cost)
    budget: int | None = Field(None, gt=0)


def initial_positions(k: int, groups: int, extra: int, rng: np.random.Generator) -> np.ndarray:
    """One-hot at each basis model (2N+1 particles), plus ``extra`` Dirichlet-random ones."""
    eye = np.broadcast_to(np.eye(k)[:, None, :], (k, groups, k)).copy()
    if extra:
        rand = rng.dirichlet(np.ones(k), size=(extra, groups))
        eye = np.concatenate([eye, rand])
    return eye


def to_json(a: np.ndarray | None) -> Any:
    return None if a is None else a.tolist()


def from_json(a: Any) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


class Optimizer(ABC):
    """ask() -> positions to score; tell(fitnesses); repeat until done()."""

    name: str

    def __init__(self, k: int, groups: int, seed: int):
        self.k, self.groups = k, groups
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.step = 0  # completed ask/tell rounds
        self.evaluations = 0
        self.best_position: np.ndarray | None = None
        self.best_fitness = -np.inf
        self.history: list[dict[str, float]] = []

    @abstractmethod
    def ask(self) -> list[np.ndarray]: ...

    @abstractmethod
    def _tell(self, positions: list[np.ndarray], fitness: np.ndarray) -> None: ...

    @abstractmethod
    def done(self) -> bool: ...

    def targets(self) -> list[tuple[float, np.ndarray] | None]:
        """For each position of the last ``ask()``: the fitness it must beat to change this
        optimiser's decisions and the position holding it (racing stops a particle that
        cannot), or None where every fitness matters (the task-arithmetic grid reads each
        point's). An optimiser that overrides this can be raced (``RACING_OPTIMIZERS``)."""
        return [None] * len(self._asked)

    _asked: list[np.ndarray] = []

    def tell(self, positions: list[np.ndarray], fitness: list[float]) -> None:
        f = np.asarray(fitness, dtype=np.float64)
        i = int(np.argmax(f))
        if f[i] > self.best_fitness:
            self.best_fitness, self.best_position = float(f[i]), positions[i].copy()
        self._tell(positions, f)
        self.evaluations += len(positions)
        self.history.append({"step": self.step, "best": self.best_fitness, "mean": float(f.mean()),
                             "std": float(f.std()), "evaluations": self.evaluations})
        self.step += 1

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "k": self.k,
            "groups": self.groups,
            "rng": self.rng.bit_generator.state,
            "step": self.step,
            "evaluations": self.evaluations,
            "best_position": to_json(self.best_position),
            "best_fitness": self.best_fitness,
            "history": self.history,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizer"] != self.name or (state["k"], state["groups"]) != (self.k, self.groups):
            raise ValueError(
                f"checkpoint is for {state['optimizer']} with K={state['k']}, G={state['groups']}; "
                f"this run is {self.name} with K={self.k}, G={self.groups}"
            )
        self.rng.bit_generator.state = state["rng"]
        self.step, self.evaluations = state["step"], state["evaluations"]
        self.best_position, self.best_fitness = from_json(state["best_position"]), state["best_fitness"]
        self.history = list(state["history"])
        self._load_extra(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass


class SwarmOptimizer(Optimizer):
    """Particles with positions, velocities and personal bests. Step 0 scores the starting
    positions; each later step moves every particle (``_move``) and scores the new positions."""

    settings: SwarmSettings

    def __init__(self, k: int, groups: int, settings: SwarmSettings, starts: Sequence[np.ndarray] = ()):
        super().__init__(k, groups, settings.seed)
        self.settings = settings
        self.x = initial_positions(k, groups, settings.extra_particles, self.rng)
        if len(starts):  # warm starts: more particles, at given positions
            self.x = np.concatenate([self.x, np.stack([np.asarray(x, dtype=np.float64) for x in starts])])
        self.v = np.zeros_like(self.x)
        self.pbest = self.x.copy()
        self.pbest_fitness = np.full(len(self.x), -np.inf)

    @abstractmethod
    def _move(self) -> tuple[np.ndarray, np.ndarray]:
        """New (positions, velocities); draws its random numbers from self.rng."""

    def over_budget(self) -> bool:
        """The next step (a whole swarm) would spend more evaluations than ``budget``."""
        b = self.settings.budget
        return b is not None and self.evaluations + len(self.x) > b

    def ask(self) -> list[np.ndarray]:
        self._pending = self._move() if self.step > 0 else (self.x, self.v)
        self._asked = list(self._pending[0])
        return self._asked

    def targets(self) -> list[tuple[float, np.ndarray] | None]:
        """Each particle must beat its personal best: nothing else of its fitness is used by
        PSO (Model Swarms also reads the worst particle, for which an estimate suffices)."""
        return [(float(f), p) if np.isfinite(f) else None for f, p in zip(self.pbest_fitness, self.pbest)]

    def _tell(self, positions, fitness):
        self.x, self.v = self._pending
        better = fitness > self.pbest_fitness
        self.pbest[better] = self.x[better]
        self.pbest_fitness[better] = fitness[better]
        return better

    def _extra_state(self):
        return {"x": to_json(self.x), "v": to_json(self.v), "pbest": to_json(self.pbest),
                "pbest_fitness": to_json(self.pbest_fitness), "config": self.settings.model_dump()}

    def _load_extra(self, state):
        self.x, self.v, self.pbest = from_json(state["x"]), from_json(state["v"]), from_json(state["pbest"])
        self.pbest_fitness = from_json(state["pbest_fitness"])
