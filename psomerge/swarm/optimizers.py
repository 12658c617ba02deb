"""Optimisers over basis coefficients, behind one ask/tell interface.

Every optimiser proposes (G, K) coefficient matrices whose rows sum to 1 and is told their
fitness. Its whole state, RNG included, is a small JSON-able dict, saved after every step:
a run resumed from the last checkpoint asks for exactly the particles an uninterrupted run
would have asked for (those scored before a crash come back from the fitness cache).
"""

from __future__ import annotations

import base64
import pickle
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from psomerge.swarm.pso import PSOConfig, clamp_velocity, initial_positions, project_bounds, pso_velocity


def _arr(a: np.ndarray | None) -> Any:
    return None if a is None else a.tolist()


def _unarr(a: Any) -> np.ndarray | None:
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
            "best_position": _arr(self.best_position),
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
        self.best_position, self.best_fitness = _unarr(state["best_position"]), state["best_fitness"]
        self.history = list(state["history"])
        self._load_extra(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass


class _Swarm(Optimizer):
    """Particles with positions, velocities and personal bests. Step 0 scores the starting
    positions; each later step moves every particle (``_move``) and scores the new positions."""

    def __init__(self, k: int, groups: int, seed: int, extra_particles: int):
        super().__init__(k, groups, seed)
        self.x = initial_positions(k, groups, extra_particles, self.rng)
        self.v = np.zeros_like(self.x)
        self.pbest = self.x.copy()
        self.pbest_fitness = np.full(len(self.x), -np.inf)

    @abstractmethod
    def _move(self) -> tuple[np.ndarray, np.ndarray]:
        """New (positions, velocities); draws its random numbers from self.rng."""

    def ask(self) -> list[np.ndarray]:
        self._pending = self._move() if self.step > 0 else (self.x, self.v)
        return list(self._pending[0])

    def _tell(self, positions, fitness):
        self.x, self.v = self._pending
        better = fitness > self.pbest_fitness
        self.pbest[better] = self.x[better]
        self.pbest_fitness[better] = fitness[better]
        return better

    def _extra_state(self):
        return {"x": _arr(self.x), "v": _arr(self.v), "pbest": _arr(self.pbest),
                "pbest_fitness": _arr(self.pbest_fitness), "config": asdict(self.config)}

    def _load_extra(self, state):
        self.x, self.v, self.pbest = _unarr(state["x"]), _unarr(state["v"]), _unarr(state["pbest"])
        self.pbest_fitness = _unarr(state["pbest_fitness"])


class PSOMerging(_Swarm):
    """PSO-Merging: particles start one-hot at the basis models, v0 = 0; the final global best wins."""

    name = "pso"

    def __init__(self, k: int, groups: int, config: PSOConfig = PSOConfig()):
        self.config = config
        super().__init__(k, groups, config.seed, config.extra_particles)

    def _move(self):
        c = self.config
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
        return self.step > self.config.steps


@dataclass(frozen=True)
class ModelSwarmsConfig:
    steps: int = 10
    step_length: float = 1.0  # lambda, decays by `decay` each step down to `min_step_length`
    decay: float = 0.95
    min_step_length: float = 0.1
    patience: int = 3  # steps without a personal-best gain before a particle restarts at it
    early_stop: int = 5  # steps without a global-best gain before the search stops
    extra_particles: int = 0
    seed: int = 0


class ModelSwarms(_Swarm):
    """Model Swarms (Feng et al., 2024) in coefficient space.

    v <- (phi_v r_v v + phi_p r_p (pbest - x) + phi_g r_g (gbest - x) - phi_w r_w (gworst - x)) / sum(phi)
    x <- x + lambda v. The phi weights are drawn per particle once and normalised; every term
    is a difference of affine positions, so positions stay affine (rows sum to 1).
    """

    name = "model_swarms"

    def __init__(self, k: int, groups: int, config: ModelSwarmsConfig = ModelSwarmsConfig()):
        self.config = config
        super().__init__(k, groups, config.seed, config.extra_particles)
        n = len(self.x)
        phi = self.rng.random((n, 4))
        self.phi = phi / phi.sum(axis=1, keepdims=True)
        self.stale = np.zeros(n, dtype=np.int64)
        self.fitness = np.full(n, -np.inf)
        self.lam = config.step_length
        self.global_stale = 0

    def _move(self):
        n = len(self.x)
        r = self.rng.random((4, n, self.groups, 1))
        worst = self.x[int(np.argmin(self.fitness))][None]
        phi = [self.phi[:, i].reshape(n, 1, 1) for i in range(4)]
        v = (phi[0] * r[0] * self.v + phi[1] * r[1] * (self.pbest - self.x)
             + phi[2] * r[2] * (self.best_position[None] - self.x) - phi[3] * r[3] * (worst - self.x))
        x = self.x + self.lam * v
        restart = self.stale >= self.config.patience
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
            self.lam = max(self.lam * self.config.decay, self.config.min_step_length)

    def done(self) -> bool:
        return self.step > self.config.steps or self.global_stale >= self.config.early_stop

    def _extra_state(self):
        return {**super()._extra_state(), "phi": _arr(self.phi), "fitness": _arr(self.fitness),
                "stale": self.stale.tolist(), "lam": self.lam, "global_stale": self.global_stale}

    def _load_extra(self, state):
        super()._load_extra(state)
        self.phi, self.fitness = _unarr(state["phi"]), _unarr(state["fitness"])
        self.stale = np.asarray(state["stale"], dtype=np.int64)
        self.lam, self.global_stale = state["lam"], state["global_stale"]


@dataclass(frozen=True)
class CMAESConfig:
    budget: int = 42  # fitness evaluations; set equal to another optimiser's to compare
    popsize: int = 7
    sigma0: float = 0.3
    seed: int = 0


class CMAES(Optimizer):
    """CMA-ES (the ``cma`` package) over coefficients, started at the uniform average.

    Free coefficients are sampled in R^(G*K) and projected onto the affine set (each row
    shifted to sum to 1), so a proposal is always a valid particle.
    """

    name = "cmaes"

    def __init__(self, k: int, groups: int, config: CMAESConfig = CMAESConfig()):
        super().__init__(k, groups, config.seed)
        import cma

        self.config = config
        x0 = np.full(groups * k, 1.0 / k)
        opts = {"popsize": config.popsize, "seed": config.seed + 1, "verbose": -9,
                "randn": _SeededRandn(config.seed), "CMA_diagonal": False}
        self.es = cma.CMAEvolutionStrategy(x0, config.sigma0, opts)

    def _project(self, flat: np.ndarray) -> np.ndarray:
        x = flat.reshape(self.groups, self.k)
        return x + (1.0 - x.sum(axis=1, keepdims=True)) / self.k

    def ask(self) -> list[np.ndarray]:
        self._raw = self.es.ask()
        return [self._project(np.asarray(r)) for r in self._raw]

    def _tell(self, positions, fitness):
        self.es.tell(self._raw, (-fitness).tolist())  # cma minimises

    def done(self) -> bool:
        return self.evaluations + self.config.popsize > self.config.budget

    def _extra_state(self):
        # CMA's covariance state has no JSON form; for G*K coefficients its pickle is a few KB
        return {"cma": base64.b64encode(pickle.dumps(self.es)).decode(), "config": asdict(self.config)}

    def _load_extra(self, state):
        self.es = pickle.loads(base64.b64decode(state["cma"]))


class _SeededRandn:
    """cma's sampler with its own seeded generator (not numpy's global one), so a run is
    reproducible and its state travels inside the pickled strategy."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rs.standard_normal(shape)
