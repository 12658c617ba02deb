"""A small persistent key -> JSON store on SQLite, shared by the fitness and judge caches.

WAL mode and a busy timeout make concurrent writers (threads, processes) safe; a duplicate
insert keeps the first row, which is right for caches of deterministic results.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any


class SqliteKV:
    def __init__(self, path: str | Path, table: str):
        if not re.fullmatch(r"[a-z_]+", table):
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = table
        self._local = threading.local()
        self._conn().execute(
            f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
            "created REAL DEFAULT (julianday('now')))"
        )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> Any | None:
        row = self._conn().execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._conn().execute(f"INSERT OR IGNORE INTO {self.table} (key, value) VALUES (?, ?)",
                             (key, json.dumps(value)))

    def replace(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, replacing what is there (for entries that grow, such
        as a raced particle's partial scores)."""
        self._conn().execute(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)",
                             (key, json.dumps(value)))

    def __len__(self) -> int:
        return self._conn().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]
