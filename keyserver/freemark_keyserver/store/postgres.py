"""The PostgreSQL store: one database shared by any number of server replicas.

The total order of the log comes from PostgreSQL's row lock on the one-row ``log_head``
table: every append transaction starts with ``UPDATE log_head SET size = size + 1``, which
locks that row until commit or rollback. A concurrent appender, in this process or another
replica, blocks on the row; when it gets it, READ COMMITTED re-reads the row's newest committed
version, so it continues from the size the first appender left, never from a stale one. A
rolled-back append also rolls back its increment, so indexes have no gaps (unlike a SEQUENCE,
which never gives numbers back).

Schema migration is serialised between replicas starting together by a transaction-scoped
advisory lock, since the tables it would lock may not exist yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from freemark_keyserver.store.records import Clock, now_micros
from freemark_keyserver.store.sql import SqlStore

__all__ = ["PostgresStore"]

# Fails a connection attempt to an unreachable server quickly instead of hanging a request.
CONNECT_TIMEOUT_S = 10

# Advisory lock key for schema migration: the first 8 bytes of SHA-256("freemark/schema") as a
# signed bigint, so it is unlikely to collide with another application's keys in a shared
# database.
_SCHEMA_LOCK_KEY = -6118834964135131250


class PostgresStore(SqlStore):
    """A `Store` in a PostgreSQL database given by a ``postgresql://`` URL, migrated on open."""

    backend = "postgres"

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = now_micros,
        connect_timeout_s: int = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(clock)
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._open()

    def _connect(self) -> psycopg.Connection[Any]:
        # Autocommit: a read is one statement and needs no transaction; writes open one
        # explicitly with `_begin`, so no transaction is ever left open by accident.
        # dict_row: rows by column name (`sql.Row`), the same as SQLite's.
        conn = psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            row_factory=dict_row,
        )
        # Pinned, whatever the database's default: append relies on READ COMMITTED re-reading
        # the log head once its lock is granted, where REPEATABLE READ would fail instead.
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return conn

    def _begin(self, conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
        return conn.transaction()

    def _pipeline(self, conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
        # libpq's pipeline mode: statements are queued and sent together, their results read
        # at the next fetch or sync; the pipeline's end syncs, so a COMMIT queued in it has
        # been answered (or its error raised) before the block exits.
        return conn.pipeline()

    def _execute(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
        # The shared SQL uses "?" placeholders and contains no literal "?" or "%".
        return conn.execute(sql.replace("?", "%s"), params)

    def _execute_many(self, conn: psycopg.Connection[Any], sql: str,
                      rows: Sequence[Sequence[Any]]) -> None:
        # psycopg pipelines executemany: one round trip for the lot.
        with conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def _is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, errors.UniqueViolation)

    def _lock_schema(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))

    def _reusable(self, conn: psycopg.Connection[Any]) -> bool:
        """A connection whose server went away must not go back to the pool."""
        return not (conn.closed or conn.broken)
