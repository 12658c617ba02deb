"""Fitness of a particle: cache look-up, else materialise into a resident model and score
the optimisation split. The held-out split is not reachable from here.

Resident models (with their generators) are pooled: a scoring call borrows a free one, or
builds one with ``make_resident`` when all are busy, and returns it afterwards. So there are
as many residents as particles scored at the same time, however many threads come and go;
the basis, suites and cache are shared read-only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psomerge.evalsuite import EvalSuite
from psomerge.evaluation import evaluate
from psomerge.swarm.basis import Basis, writable_tensors
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


@dataclass
class Resident:
    """Weights that particles are written into, and the generator that runs them.

    ``model`` is a torch model (transformers backend: the generator runs it) or a mapping
    name -> tensor (vLLM backend: a shared file the engine reloads from).
    """

    model: Any
    generator: Any

    def load_particle(self, basis: Basis, coeffs: np.ndarray) -> None:
        basis.materialise(coeffs, self.model)
        self.generator.weights_changed()

    def load_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy named tensors (e.g. of a merged checkpoint) into the weights; others stay."""
        target = writable_tensors(self.model)
        for name, value in tensors:
            if name in target:
                target[name].copy_(value)
        self.generator.weights_changed()

    def close(self) -> None:
        self.generator.close()


class ParticleEvaluator:
    def __init__(self, basis: Basis, suites: Sequence[EvalSuite], cache: FitnessCache | None,
                 make_resident: Callable[[], Resident], generation_config: dict):
        self.basis, self.suites, self.cache = basis, list(suites), cache
        self.make_resident = make_resident
        self.fingerprint = evaluation_fingerprint(self.suites, generation_config)
        self.counts = FitnessCounts()
        self._counts_lock = threading.Lock()
        self._free: list[Resident] = []
        self.residents: list[Resident] = []

    @contextmanager
    def resident(self) -> Iterator[Resident]:
        """Borrow a resident model for the duration of the block."""
        with self._counts_lock:
            r = self._free.pop() if self._free else None
        if r is None:
            r = self.make_resident()
            with self._counts_lock:
                self.residents.append(r)
        try:
            yield r
        finally:
            with self._counts_lock:
                self._free.append(r)

    def close(self) -> None:
        """Release every resident (stops vLLM engines); a later call builds new ones."""
        with self._counts_lock:
            residents, self.residents, self._free = self.residents, [], []
        for r in residents:
            r.close()

    def key(self, coeffs: np.ndarray) -> str:
        return particle_key(self.basis.fingerprint, coeffs, self.fingerprint)

    def __call__(self, coeffs: np.ndarray) -> CachedFitness:
        key = self.key(coeffs)
        hit = self.cache.get(key) if self.cache is not None else None
        with self._counts_lock:
            self.counts.calls += 1
            self.counts.cache_hits += hit is not None
        if hit is not None:
            return hit
        with self.resident() as r:
            r.load_particle(self.basis, coeffs)
            result = evaluate(r.generator, self.suites, "optimisation")
        with self._counts_lock:
            self.counts.scorings += 1
            self.counts.examples_scored += result.num_examples
        value = CachedFitness(result.fitness, result.scores, {"examples": result.num_examples})
        if self.cache is not None:
            self.cache.put(key, value)
        return value
