"""Persistent fitness cache: an identical particle is never scored twice, in any run.

Key = hash(basis fingerprint, coefficients rounded to ``PRECISION``, evaluation fingerprint
(eval suites with their data, splits and scorer configs, and generation settings)).
SQLite in WAL mode with a busy timeout, so concurrent writers (threads, processes) are safe;
a duplicate insert keeps the first row (both rows hold the same deterministic score).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PRECISION = 1e-6  # coefficients equal to this precision are the same particle


def particle_key(basis_fingerprint: str, coeffs: np.ndarray, eval_fingerprint: str) -> str:
    rounded = np.round(np.asarray(coeffs, dtype=np.float64) / PRECISION).astype(np.int64)
    rounded[rounded == 0] = 0  # -0 and 0 are one particle
    payload = json.dumps([basis_fingerprint, list(rounded.shape), rounded.ravel().tolist(), eval_fingerprint])
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


@dataclass(frozen=True)
class CachedFitness:
    fitness: float
    scores: dict[str, float]
    meta: dict[str, Any]


class FitnessCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.hits = 0
        self.misses = 0
        with self._conn() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS fitness (key TEXT PRIMARY KEY, fitness REAL NOT NULL, "
                "scores TEXT NOT NULL, meta TEXT NOT NULL, created REAL DEFAULT (julianday('now')))"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> CachedFitness | None:
        row = self._conn().execute("SELECT fitness, scores, meta FROM fitness WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return CachedFitness(row[0], json.loads(row[1]), json.loads(row[2]))

    def put(self, key: str, value: CachedFitness) -> None:
        self._conn().execute(
            "INSERT OR IGNORE INTO fitness (key, fitness, scores, meta) VALUES (?, ?, ?, ?)",
            (key, value.fitness, json.dumps(value.scores), json.dumps(value.meta)),
        )

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM fitness").fetchone()[0]
