"""Scores of particles and checkpoints on the eval suites' splits: cache look-up, else
materialise into a resident model, generate and score.

Fitness is the weighted mean of the suites' fitness objective on the optimisation split
(the judge, or the judge mixed with smooth likelihood terms), optionally raced against a
target (``racing.py``). Report rows use the judge on every split through ``evaluate``; the
held-out split is read only there, by the final evaluation.

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

from psomerge.evaluation import EvalResult, EvalSuite, Split, evaluate, weighted_mean
from psomerge.generation import Generator
from psomerge.hashing import digest
from psomerge.io import Checkpoint, check_compatible
from psomerge.progress import SILENT, Progress
from psomerge.swarm.basis import Basis
from psomerge.swarm.cache import CachedFitness, FitnessCache, checkpoint_key, particle_key
from psomerge.swarm.materialise import writable_tensors
from psomerge.swarm.racing import RacingSettings, estimate, should_stop


def evaluation_fingerprint(suites: Sequence[EvalSuite], generation_config: dict, objective: str = "judge") -> str:
    """What a score was measured on and how: suites (data, splits, scorer or fitness terms,
    weight) and the generation settings."""
    return digest([[s.fingerprint(objective), s.weight] for s in suites] + [generation_config])


@dataclass(frozen=True)
class Race:
    """What a raced particle must beat: a fitness, and the particle that holds it (whose
    per-example values, when cached, make the comparison paired)."""

    target: float
    holder: np.ndarray | None = None


@dataclass
class FitnessCounts:
    calls: int = 0  # fitness requests, cached or not
    scorings: int = 0  # particles actually materialised and scored
    cache_hits: int = 0
    examples_scored: int = 0


def load_particle(generator: Generator, basis: Basis, coeffs: np.ndarray) -> None:
    """Put the particle into the resident: summed in its own process where it takes
    coefficients (a vLLM engine writing into its weights), else here into its ``weights``."""
    load = getattr(generator, "load_coefficients", None)
    if load is None or not load(basis, coeffs):
        basis.materialise(coeffs, generator.weights)
        generator.weights_changed()


class ParticleEvaluator:
    def __init__(self, basis: Basis, suites: Sequence[EvalSuite], cache: FitnessCache | None,
                 open_generator: Callable[[], Generator], generation_config: dict,
                 racing: RacingSettings | None = None, progress: Progress = SILENT):
        self.basis, self.suites, self.cache = basis, list(suites), cache
        self.progress = progress
        self.open_generator = open_generator
        self.racing = racing
        self.fingerprint = evaluation_fingerprint(self.suites, generation_config)  # report rows: the judges
        self.fitness_fingerprint = evaluation_fingerprint(self.suites, generation_config, "fitness")
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
        """Cache key of a particle's judge scores on a split (report rows)."""
        return particle_key(self.basis.fingerprint, coeffs, self.fingerprint, split)

    def fitness_key(self, coeffs: np.ndarray) -> str:
        return particle_key(self.basis.fingerprint, coeffs, self.fitness_fingerprint)

    def __call__(self, coeffs: np.ndarray, race: Race | None = None) -> CachedFitness:
        """The particle's fitness (optimisation split), counted as one fitness call; raced
        against ``race`` when racing is on (then possibly an estimate, flagged ``raced``)."""
        key = self.fitness_key(coeffs)
        hit = self.cache.get(key) if self.cache is not None else None
        with self._lock:
            self.counts.calls += 1
            self.counts.cache_hits += hit is not None
        if hit is not None:
            return hit
        racing = self.racing is not None and race is not None and np.isfinite(race.target)
        with self.resident() as r:
            load_particle(r, self.basis, coeffs)
            resumed = False
            if racing:
                value, complete, scored, resumed = self._race(r, key, race)
            else:
                result = evaluate(r, self.suites, "optimisation", "fitness")
                value, complete, scored = self._fitness(result), True, result.num_examples
        with self._lock:
            if resumed and not scored:  # a raced particle asked again, stopped where its kept partial result stopped
                self.counts.cache_hits += 1
            else:
                self.counts.scorings += 1
                self.counts.examples_scored += scored
        if complete and self.cache is not None:
            self.cache.put(key, value)
        return value

    def _fitness(self, result: EvalResult) -> CachedFitness:
        return CachedFitness(result.fitness, result.scores, {"examples": result.num_examples, "scored": result.scored})

    def _race(self, resident: Generator, key: str, race: Race) -> tuple[CachedFitness, bool, int, bool]:
        """Score chunk after chunk until the particle is complete or cannot beat the target.
        Returns (fitness, complete, examples scored by this call, whether it went on from a
        kept partial result); a partial result is kept so a later request continues there."""
        settings = self.racing
        sizes = {s.name: len(s.split("optimisation")) for s in self.suites}
        weights = {s.name: s.weight for s in self.suites}
        partial = self.cache.get(key + ":partial") if self.cache is not None else None
        seen: dict[str, list[float]] = {s: list(partial.meta["scored"][s]) if partial else [] for s in sizes}
        holder = self.cache.get(self.fitness_key(race.holder)) if self.cache is not None and race.holder is not None \
            else None
        target_values = holder.meta.get("scored") if holder is not None else None
        scored = 0
        while not should_stop(seen, sizes, weights, race.target, target_values, settings):
            select = {s: range(len(seen[s]), min(len(seen[s]) + settings.chunk, sizes[s])) for s in sizes}
            if not any(select.values()):
                break
            result = evaluate(resident, self.suites, "optimisation", "fitness", select)
            for s in sizes:
                seen[s] += result.scored[s]
            scored += result.num_examples
        complete = all(len(seen[s]) == sizes[s] for s in sizes)
        resumed = partial is not None
        means = {s: sum(v) / len(v) if v else 0.0 for s, v in seen.items()}
        n = sum(len(v) for v in seen.values())
        if complete:
            full = CachedFitness(weighted_mean(means, self.suites), means, {"examples": n, "scored": seen})
            return full, True, scored, resumed
        if target_values is not None:
            fitness, _ = estimate(seen, sizes, weights, target_values, race.target)
        else:
            fitness = weighted_mean(means, self.suites)
        if self.cache is not None:
            self.cache.put_latest(key + ":partial", CachedFitness(fitness, means, {"examples": n, "scored": seen}))
        return CachedFitness(fitness, means, {"examples": n, "scored": seen, "raced": True}), False, scored, resumed

    def evaluate(self, coeffs: np.ndarray, split: Split) -> EvalResult:
        """Scores of a particle on a split, cached like fitness (not counted as a fitness call)."""
        def compute() -> EvalResult:
            with self.resident() as r:
                load_particle(r, self.basis, coeffs)
                return self._evaluate_split(r, split)

        return self._cached(self.key(coeffs, split), compute)

    def _evaluate_split(self, resident: Generator, split: Split) -> EvalResult:
        task = self.progress.start(f"scoring the {split} split", sum(len(s.split(split)) for s in self.suites))
        try:
            return evaluate(resident, self.suites, split, progress=task)
        finally:
            task.close()

    def evaluate_checkpoint(self, model_dir: str | Path, split: Split) -> EvalResult:
        """Scores of a checkpoint folder (e.g. a static merge) on a split, loaded into a
        resident model (no second model), cached by its content hash."""
        ckpt = Checkpoint(model_dir)
        check_compatible(self.basis.members[0], [ckpt])

        def compute() -> EvalResult:
            with self.resident() as r, ckpt:
                target = writable_tensors(r.weights, self.basis.names)
                for name in self.basis.names:
                    if name in target:
                        target[name].copy_(ckpt.get(name))
                r.weights_changed()
                return self._evaluate_split(r, split)

        return self._cached(checkpoint_key(ckpt.fingerprint(), self.fingerprint, split), compute)

    def _cached(self, key: str, compute: Callable[[], EvalResult]) -> EvalResult:
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None and "scored" in hit.meta:  # older entries lack per-example values: recompute
            return EvalResult(hit.scores, hit.fitness, int(hit.meta.get("examples", 0)), hit.meta["scored"])
        result = compute()
        if self.cache is not None:
            self.cache.put_latest(key, self._fitness(result))
        return result
