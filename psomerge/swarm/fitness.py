"""Scores of particles and checkpoints on the eval suites' splits: cache look-up, else
materialise into a resident model, generate and score.

Fitness is the weighted mean score on the optimisation split. The held-out split is read
only through ``evaluate(..., "heldout")``, which only the final evaluation calls.

Resident models (generators) are pooled: a scoring call borrows a free one, or opens one with
``open_generator`` when all are busy, and returns it afterwards. So there are as many
residents as particles scored at the same time, however many threads come and go; the basis,
suites and cache are shared read-only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psomerge.evaluation import EvalResult, EvalSuite, Split, evaluate
from psomerge.generation import Generator
from psomerge.hashing import digest
from psomerge.io import Checkpoint, check_compatible
from psomerge.swarm.basis import Basis
from psomerge.swarm.cache import CachedFitness, FitnessCache, checkpoint_key, particle_key
from psomerge.swarm.materialise import writable_tensors


def evaluation_fingerprint(suites: Sequence[EvalSuite], generation_config: dict) -> str:
    """What a score was measured on and how: suites (data, split, scorer, weight) and the
    generation settings."""
    return digest([[s.fingerprint(), s.weight] for s in suites] + [generation_config])


@dataclass
class FitnessCounts:
    calls: int = 0  # fitness requests, cached or not
    scorings: int = 0  # particles actually materialised and scored
    cache_hits: int = 0
    examples_scored: int = 0


def load_particle(generator: Generator, basis: Basis, coeffs: np.ndarray) -> None:
    basis.materialise(coeffs, generator.weights)
    generator.weights_changed()


class ParticleEvaluator:
    def __init__(self, basis: Basis, suites: Sequence[EvalSuite], cache: FitnessCache | None,
                 open_generator: Callable[[], Generator], generation_config: dict):
        self.basis, self.suites, self.cache = basis, list(suites), cache
        self.open_generator = open_generator
        self.fingerprint = evaluation_fingerprint(self.suites, generation_config)
        self.counts = FitnessCounts()
        self._lock = threading.Lock()
        self._free: list[Generator] = []
        self.residents: list[Generator] = []

    @contextmanager
    def resident(self) -> Iterator[Generator]:
        """Borrow a resident model for the duration of the block."""
        with self._lock:
            r = self._free.pop() if self._free else None
        if r is None:
            r = self.open_generator()
            with self._lock:
                self.residents.append(r)
        try:
            yield r
        finally:
            with self._lock:
                self._free.append(r)

    def generated_tokens(self) -> int:
        return sum(r.stats.new_tokens for r in self.residents)

    def close(self) -> None:
        """Release every resident (stops vLLM engines); a later call opens new ones."""
        with self._lock:
            residents, self.residents, self._free = self.residents, [], []
        for r in residents:
            r.close()

    def key(self, coeffs: np.ndarray, split: Split = "optimisation") -> str:
        return particle_key(self.basis.fingerprint, coeffs, self.fingerprint, split)

    def __call__(self, coeffs: np.ndarray) -> CachedFitness:
        """The particle's fitness (optimisation split), counted as one fitness call."""
        key = self.key(coeffs)
        hit = self.cache.get(key) if self.cache is not None else None
        with self._lock:
            self.counts.calls += 1
            self.counts.cache_hits += hit is not None
        if hit is not None:
            return hit
        with self.resident() as r:
            load_particle(r, self.basis, coeffs)
            result = evaluate(r, self.suites, "optimisation")
        with self._lock:
            self.counts.scorings += 1
            self.counts.examples_scored += result.num_examples
        value = CachedFitness(result.fitness, result.scores, {"examples": result.num_examples})
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    def evaluate(self, coeffs: np.ndarray, split: Split) -> EvalResult:
        """Scores of a particle on a split, cached like fitness (not counted as a fitness call)."""
        def compute() -> EvalResult:
            with self.resident() as r:
                load_particle(r, self.basis, coeffs)
                return evaluate(r, self.suites, split)

        return self._cached(self.key(coeffs, split), compute)

    def evaluate_checkpoint(self, model_dir: str | Path, split: Split) -> EvalResult:
        """Scores of a checkpoint folder (e.g. a static merge) on a split, loaded into a
        resident model (no second model), cached by its content hash."""
        ckpt = Checkpoint(model_dir)
        check_compatible(self.basis.members[0], [ckpt])

        def compute() -> EvalResult:
            with self.resident() as r, ckpt:
                target = writable_tensors(r.weights)
                for name in self.basis.names:
                    if name in target:
                        target[name].copy_(ckpt.get(name))
                r.weights_changed()
                return evaluate(r, self.suites, split)

        return self._cached(checkpoint_key(ckpt.fingerprint(), self.fingerprint, split), compute)

    def _cached(self, key: str, compute: Callable[[], EvalResult]) -> EvalResult:
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            return EvalResult(hit.scores, hit.fitness, int(hit.meta.get("examples", 0)))
        result = compute()
        if self.cache is not None:
            self.cache.put(key, CachedFitness(result.fitness, result.scores, {"examples": result.num_examples}))
        return result
