"""The SQLite store: the embedded default, one database file, no server to run.

Every write transaction starts with ``BEGIN IMMEDIATE``, which takes SQLite's single database
write lock before anything is read: appends from any thread or process are therefore strictly
one after another, and the log head read inside is always the latest. WAL journaling lets
readers go on while a writer holds that lock; a busy timeout makes a second writer wait for
it instead of failing. ``synchronous=FULL`` makes a commit durable before a receipt for it can
be signed, and foreign keys are switched on so the database refuses a registration that has
no log entry.

Host blobs (sealed registered models, gigabytes each) are files in a directory beside the
database file, ``<database>-blobs`` (`blobfiles`): written once instead of twice through the
write-ahead log, each fsynced before the registration that refers to it commits. Blobs written
as `host_blobs` rows before that are still read, counted and collected where they are.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from freemark_keyserver.store.blobfiles import BlobFiles
from freemark_keyserver.store.errors import DuplicateError
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
        self._blobs = BlobFiles(Path(self._path + "-blobs"))
        self._open()

    # host models: files beside the database (rows written before them still read)

    def put_host_blob(self, registration_id: str, segments: Iterable[bytes]) -> int:
        if super().host_blob_segments(registration_id):
            raise DuplicateError(f"host blob {registration_id!r} already exists")
        return self._blobs.put(registration_id, segments, written_at=self._clock())

    def host_blob(self, registration_id: str) -> Iterator[bytes]:
        segments = self._blobs.read(registration_id)
        yield from super().host_blob(registration_id) if segments is None else segments

    def host_blob_segments(self, registration_id: str) -> int:
        count = self._blobs.count(registration_id)
        return super().host_blob_segments(registration_id) if count is None else count

    def collect_orphan_host_blobs(self, written_before: int) -> int:
        collected = super().collect_orphan_host_blobs(written_before)
        for blob_id, path, written_at in list(self._blobs.ids()):
            if written_at >= written_before:
                continue
            if blob_id is None or not self._rows(
                "SELECT 1 FROM registrations WHERE registration_id = ? UNION ALL"
                " SELECT 1 FROM panel_members WHERE member_id = ?", (blob_id, blob_id)
            ):
                path.unlink(missing_ok=True)
                collected += blob_id is not None
        return collected

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
