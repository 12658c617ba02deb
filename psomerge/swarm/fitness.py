"""Fitness of a particle: cache look-up, else materialise into the resident model and score
the optimisation split. The held-out split is not reachable from here."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from psomerge.evalsuite import EvalSuite
from psomerge.evaluation import evaluate
from psomerge.swarm.basis import Basis
from psomerge.swarm.cache import CachedFitness, FitnessCache, particle_key


def evaluation_fingerprint(suites: Sequence[EvalSuite], generation_config: dict) -> str:
    payload = json.dumps([[s.fingerprint(), s.weight] for s in suites] + [generation_config], sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


@dataclass
class FitnessCounts:
    calls: int = 0  # fitness requests, cached or not
    scorings: int = 0  # particles actually materialised and scored
    cache_hits: int = 0
    examples_scored: int = 0


class ParticleEvaluator:
    """Scores particles on the optimisation split with one resident model."""

    def __init__(self, basis: Basis, model, generator, suites: Sequence[EvalSuite], cache: FitnessCache | None = None):
        self.basis, self.model, self.generator, self.suites = basis, model, generator, list(suites)
        self.cache = cache
        self.fingerprint = evaluation_fingerprint(self.suites, generator.config())
        self.counts = FitnessCounts()
        self._lock = threading.Lock()  # one resident model: one particle at a time

    def key(self, coeffs: np.ndarray) -> str:
        return particle_key(self.basis.fingerprint, coeffs, self.fingerprint)

    def __call__(self, coeffs: np.ndarray) -> CachedFitness:
        key = self.key(coeffs)
        with self._lock:
            self.counts.calls += 1
            if self.cache is not None and (hit := self.cache.get(key)) is not None:
                self.counts.cache_hits += 1
                return hit
            self.basis.materialise(coeffs, self.model)
            result = evaluate(self.generator, self.suites, "optimisation")
            self.counts.scorings += 1
            self.counts.examples_scored += result.num_examples
            value = CachedFitness(result.fitness, result.scores, {"examples": result.num_examples})
            if self.cache is not None:
                self.cache.put(key, value)
            return value
