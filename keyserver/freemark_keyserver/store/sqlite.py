"""The SQLite store: the embedded default, one database file, no server to run.

Every write transaction starts with ``BEGIN IMMEDIATE``, which takes SQLite's single database
write lock before anything is read: appends from any thread or process are therefore strictly
one after another, and the log head read inside is always the latest. WAL journaling lets
readers go on while a writer holds that lock; a busy timeout makes a second writer wait for
it instead of failing. ``synchronous=FULL`` makes a commit durable before a receipt for it can
be signed, and foreign keys are switched on so the database refuses a registration that has
no log entry.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from freemark_keyserver.store.records import Clock, now_micros
from freemark_keyserver.store.sql import SqlStore

__all__ = ["SqliteStore"]

# How long a writer waits for another writer's transaction before giving up. Appends are
# short, so reaching this means something is stuck, not busy.
BUSY_TIMEOUT_S = 30.0


class SqliteStore(SqlStore):
    """A `Store` in one SQLite file, created and migrated on open."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = now_micros,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        super().__init__(clock)
        self._path = os.fspath(path)
        self._busy_timeout_s = busy_timeout_s
        self._open()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module must not open transactions behind our back; every
        # transaction is an explicit BEGIN IMMEDIATE. check_same_thread=False: the pool hands
        # a connection to one thread at a time, but not always the thread that opened it.
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        # Rows by column name (`sql.Row`); sqlite3.Row is a mapping as well as a tuple.
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _begin(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite rolls some failures back by itself; a second ROLLBACK would then raise
            # and hide the error that matters.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _execute(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(sql, params)

    def _execute_many(self, conn: sqlite3.Connection, sql: str,
                      rows: Sequence[Sequence[Any]]) -> None:
        conn.executemany(sql, rows)

    def _is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and getattr(
            error, "sqlite_errorname", ""
        ) in {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}

    def _lock_schema(self, conn: sqlite3.Connection) -> None:
        """Nothing to add: ``BEGIN IMMEDIATE`` already excludes every other writer."""
