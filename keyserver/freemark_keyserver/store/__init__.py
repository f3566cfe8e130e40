"""Storage for the key server: principals, registrations and the append-only log.

One `Store` interface with two backends: SQLite for a file path (the embedded default, one
server) and PostgreSQL for a ``postgresql://`` URL (several server replicas sharing one
database). Priority between rival registrations is decided by log order (DESIGN §1.2), so the
one thing every backend must get right is `Store.append`: log indexes form a single total order
across threads, processes and replicas, with no gaps, and a registration is committed in the
same transaction as its log entry, so neither can ever exist without the other.

Envelopes and log entries are opaque bytes here: encryption, canonical JSON and Merkle proofs
live in `freemark_keyserver.crypto` and `freemark.tlog.merkle`.

Registered host models can be gigabytes, so they are not columns of the registration: their
sealed segments are stored on their own (`put_host_blob`; PostgreSQL: rows, a few megabytes
per transaction; SQLite: one file beside the database, `blobfiles`), written before the
registration that refers to them, and read back one segment at a time (`host_blob`). Segments whose registration never committed (a crash, a failed append) are
invisible to every reader and are collected when a store opens, once they are older than
`ORPHAN_GRACE_S`.

The package, by job: `records` (the frozen records and the clock), `errors`, `interface` (the
`Store` ABC), `sql` (the implementation both backends share, reading rows by column name),
`pool` (connection pooling), `migrations` (the versioned schema), and the backends `sqlite`
and `postgres`. This module re-exports the public names and holds the factory, `open_store`.

Quick start::

    store = open_store("freemark.db")        # or "postgresql://user:pw@host/db"
    entry = store.append("register", lambda index, now: build_json(index, now), registration)
    assert store.get_registration(registration.registration_id).log_index == entry.index
    store.close()
"""

from __future__ import annotations

from freemark_keyserver.store.errors import DuplicateError, NotFoundError, StoreError
from freemark_keyserver.store.interface import ORPHAN_GRACE_S, Store
from freemark_keyserver.store.records import (
    ROLES,
    CheckpointSigner,
    ClaimSignature,
    Clock,
    EntrySigner,
    LogEntry,
    PanelMember,
    Pending,
    Principal,
    Registration,
    StoredCheckpoint,
    now_micros,
)

__all__ = [
    "ORPHAN_GRACE_S",
    "ROLES",
    "CheckpointSigner",
    "ClaimSignature",
    "Clock",
    "DuplicateError",
    "EntrySigner",
    "LogEntry",
    "NotFoundError",
    "PanelMember",
    "Pending",
    "Principal",
    "Registration",
    "Store",
    "StoreError",
    "StoredCheckpoint",
    "now_micros",
    "open_store",
]


def open_store(db: str, *, clock: Clock = now_micros) -> Store:
    """Open (creating and migrating as needed) the store named by `db`.

    A ``postgresql://`` or ``postgres://`` URL selects PostgreSQL; anything else is a SQLite
    file path. Backends are imported here so that an SQLite deployment never needs psycopg.
    """
    if db.startswith(("postgresql://", "postgres://")):
        from freemark_keyserver.store.postgres import PostgresStore

        return PostgresStore(db, clock=clock)
    from freemark_keyserver.store.sqlite import SqliteStore

    return SqliteStore(db, clock=clock)
