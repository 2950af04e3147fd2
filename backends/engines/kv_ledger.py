"""The KV state cache's ledger: hit counts per saved state and in total (for `moechat cache`).

A small SQLite file beside the state files. The files themselves are the truth about what
is saved (each describes itself, see kv_state_file.py); the ledger only counts, so losing
or corrupting it loses numbers, never states. Several processes may count at once (SQLite
locks; a busy ledger waits up to a second, then the count is skipped with a note).
Standard library only.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

FILE_NAME = "ledger.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (name TEXT PRIMARY KEY, hits INTEGER NOT NULL DEFAULT 0,
                                    restored_tokens INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
TOTALS = ("hits", "misses", "saves", "restored_tokens")


class Ledger:
    def __init__(self, root: Path):
        self.path = root / FILE_NAME

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
        db.executescript(SCHEMA)
        return db

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        try:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                for sql, params in statements:
                    db.execute(sql, params)
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as err:  # counting is best effort; the states are unaffected
            print(f"moechat: KV cache ledger {self.path}: {err} (counts not updated)", file=sys.stderr)

    @staticmethod
    def _add(key: str, n: int) -> tuple[str, tuple]:
        return ("INSERT INTO totals (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (key, n))

    def hit(self, name: str, restored_tokens: int) -> None:
        self._write([
            ("INSERT INTO entries (name, hits, restored_tokens) VALUES (?, 1, ?) ON CONFLICT(name) "
             "DO UPDATE SET hits = hits + 1, restored_tokens = restored_tokens + excluded.restored_tokens",
             (name, restored_tokens)),
            self._add("hits", 1), self._add("restored_tokens", restored_tokens)])

    def miss(self) -> None:
        self._write([self._add("misses", 1)])

    def saved(self) -> None:
        self._write([self._add("saves", 1)])

    def forget(self, names) -> None:
        self._write([("DELETE FROM entries WHERE name = ?", (name,)) for name in names])

    def read(self) -> tuple[dict[str, int], dict[str, int]]:
        """(totals, hits per entry name); zeros when there is no ledger yet."""
        totals = dict.fromkeys(TOTALS, 0)
        if not self.path.exists():
            return totals, {}
        try:
            db = self._connect()
            try:
                totals.update(dict(db.execute("SELECT key, value FROM totals")))
                hits = dict(db.execute("SELECT name, hits FROM entries"))
            finally:
                db.close()
        except sqlite3.Error as err:
            print(f"moechat: KV cache ledger {self.path}: {err}", file=sys.stderr)
            return totals, {}
        return totals, hits
