"""Persistent fitness cache: an identical particle is never scored twice, in any run.

A particle's key = hash(basis fingerprint, coefficients rounded to ``PRECISION``, evaluation
fingerprint, split, ``SCORING_VERSION``). The basis fingerprint covers the content of base
and experts (weights, config.json, generation_config.json, tokenizer files) and the DARE
settings; the evaluation fingerprint covers each suite's data (every field of every record),
split sizes and seed, scorer config and weight, and the generation settings. A checkpoint
folder (a static merge) is keyed by its content hash instead of coefficients. Stored in
SQLite (psomerge.kvstore), safe under concurrent writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psomerge.hashing import digest
from psomerge.kvstore import SqliteKV

PRECISION = 1e-6  # coefficients equal to this precision are the same particle
# Bump when a change to psomerge's generation or scoring code changes the score of the same
# model on the same data: every cached score is then measured again.
SCORING_VERSION = "2"


def particle_key(basis_fingerprint: str, coeffs: np.ndarray, eval_fingerprint: str,
                 split: str = "optimisation") -> str:
    """Key of a particle's scores on one split (the optimisation split is its fitness)."""
    rounded = np.round(np.asarray(coeffs, dtype=np.float64) / PRECISION).astype(np.int64)
    rounded[rounded == 0] = 0  # -0 and 0 are one particle
    scope = eval_fingerprint if split == "optimisation" else f"{eval_fingerprint}:{split}"
    return digest([basis_fingerprint, list(rounded.shape), rounded.ravel().tolist(), scope, SCORING_VERSION], 20)


def checkpoint_key(checkpoint_fingerprint: str, eval_fingerprint: str, split: str) -> str:
    """Key of a checkpoint folder's scores on one split."""
    return f"folder:{checkpoint_fingerprint}:{eval_fingerprint}:{split}:{SCORING_VERSION}"


@dataclass(frozen=True)
class CachedFitness:
    fitness: float
    scores: dict[str, float]
    meta: dict[str, Any]


class FitnessCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._store = SqliteKV(path, "fitness_cache")
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedFitness | None:
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return CachedFitness(value["fitness"], value["scores"], value["meta"])

    def put(self, key: str, value: CachedFitness) -> None:
        """Store a result; a key already there keeps its first value (results are deterministic)."""
        self._store.put(key, {"fitness": value.fitness, "scores": value.scores, "meta": value.meta})

    def put_latest(self, key: str, value: CachedFitness) -> None:
        """Store a result, replacing an older one (a partial result that grew, or an entry
        written before per-example values were kept)."""
        self._store.replace(key, {"fitness": value.fitness, "scores": value.scores, "meta": value.meta})

    def __len__(self) -> int:
        return len(self._store)
