"""A small persistent key -> JSON store on SQLite, shared by the fitness and judge caches.

WAL mode and a busy timeout make concurrent writers (threads, processes) safe; a duplicate
insert keeps the first row, which is right for caches of deterministic results. A file that
is not such a store (corrupt, not SQLite, another table layout) is an error naming the file
and how to set it aside; it is never overwritten or silently replaced. A full disk is an error
naming the file too.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from psomerge.errors import CacheError

_COLUMNS = {"key", "value"}
_CORRUPT = ("not a database", "malformed", "no such table", "no such column", "has no column")
_FULL = ("database or disk is full", "disk I/O error")


class SqliteKV:
    def __init__(self, path: str | Path, table: str):
        if not re.fullmatch(r"[a-z_]+", table):
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = table
        self._local = threading.local()
        with self._errors():
            conn = self._conn()
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                "created REAL DEFAULT (julianday('now')))"
            )
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not _COLUMNS <= columns:
            raise CacheError(f"{self.path}: table {table!r} has columns {sorted(columns)}, not a psomerge cache's "
                             f"{sorted(_COLUMNS)}; {self._move_aside()}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _move_aside(self) -> str:
        files = [f for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")) if f.exists()]
        moves = "; ".join(f"mv {f} {f}.corrupt" for f in files)
        return f"it holds only results that can be recomputed: move it aside ({moves}) and run again"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A corrupt file as a CacheError naming it and the fix; other SQLite errors (a busy
        or locked database) stay as they are: they may pass, and are retried as such."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if any(s in str(exc) for s in _CORRUPT):
                raise CacheError(f"{self.path}: corrupt cache file ({exc}); {self._move_aside()}") from exc
            if any(s in str(exc) for s in _FULL):
                raise CacheError(f"{self.path}: cannot write the cache ({exc}); what it holds is kept: free space "
                                 "and run again (--resume)") from exc
            raise

    def get(self, key: str) -> Any | None:
        with self._errors():
            row = self._conn().execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except (TypeError, json.JSONDecodeError) as exc:
            raise CacheError(f"{self.path}: corrupt cache entry {key!r} ({exc}); {self._move_aside()}") from None

    def put(self, key: str, value: Any) -> None:
        with self._errors():
            self._conn().execute(f"INSERT OR IGNORE INTO {self.table} (key, value) VALUES (?, ?)",
                                 (key, json.dumps(value)))

    def replace(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, replacing what is there (for entries that grow, such
        as a raced particle's partial scores)."""
        with self._errors():
            self._conn().execute(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)",
                                 (key, json.dumps(value)))

    def __len__(self) -> int:
        with self._errors():
            return self._conn().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]
