"""Versioned schema migrations for both store backends, applied when a store opens.

Each `Migration` carries its SQLite and its PostgreSQL statements side by side, so the two
schemas move in lock step and a version number means the same thing on both. Applied versions
are recorded in ``schema_migrations``; `migrate` applies only the missing ones, so opening a
store any number of times is harmless. The caller runs `migrate` inside one write transaction
that also serialises concurrent openers (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
PostgreSQL): DDL is transactional on both, so a failed migration leaves the previous version.

Never edit a released migration: add a new version. A database newer than this code is
refused rather than written to, since an old replica cannot know what a newer schema means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from freemark_keyserver.store.errors import StoreError

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Backend", "Migration", "SchemaError", "migrate"]

Backend = Literal["sqlite", "postgres"]

# Runs one statement with "?" placeholders and returns a DB-API cursor whose rows are read by
# column name.
Execute = Callable[..., Any]


class SchemaError(StoreError):
    """The database's schema is one this code cannot work with."""


@dataclass(frozen=True)
class Migration:
    """One schema version: what it is for, and its statements per backend."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, backend: Backend) -> tuple[str, ...]:
        return self.sqlite if backend == "sqlite" else self.postgres


def _tables(blob: str, integer: str, boolean: str, length: str) -> tuple[str, ...]:
    """Version 1's tables, spelled in one backend's types.

    The log index is the primary key (unique, so a bug can never store two entries at one
    index) and registrations reference their log entry, so the database itself refuses a
    registration without one.
    """
    return (
        f"""CREATE TABLE principals (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('owner', 'arbiter', 'admin')),
            token_hash {blob} NOT NULL UNIQUE,
            created_at {integer} NOT NULL,
            disabled {boolean} NOT NULL
        )""",
        f"""CREATE TABLE log_entries (
            idx {integer} PRIMARY KEY CHECK (idx >= 0),
            kind TEXT NOT NULL,
            entry {blob} NOT NULL,
            leaf_hash {blob} NOT NULL CHECK ({length}(leaf_hash) = 32),
            created_at {integer} NOT NULL
        )""",
        f"""CREATE TABLE registrations (
            registration_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            created_at {integer} NOT NULL,
            host_fingerprint {blob} NOT NULL,
            architecture_digest {blob} NOT NULL,
            layer TEXT NOT NULL,
            units {integer} NOT NULL,
            n_bits {integer} NOT NULL,
            commitment {blob} NOT NULL,
            key_version {integer} NOT NULL,
            envelope {blob} NOT NULL,
            host_envelope {blob} NOT NULL,
            log_index {integer} NOT NULL UNIQUE REFERENCES log_entries (idx),
            revoked_at {integer}
        )""",
        f"""CREATE TABLE checkpoints (
            tree_size {integer} PRIMARY KEY CHECK (tree_size >= 0),
            body {blob} NOT NULL,
            signature {blob} NOT NULL
        )""",
    )


def _head_and_indexes(integer: str) -> tuple[str, ...]:
    """Version 2: indexes for the lookups made on every register and list call, and the log head.

    The one-row head's increment is the single point every append serialises on (and makes
    tree_size O(1)); it is seeded from the entries a version 1 database already holds.
    """
    return (
        f"""CREATE TABLE log_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            size {integer} NOT NULL CHECK (size >= 0)
        )""",
        "INSERT INTO log_head (id, size) SELECT 1, COUNT(*) FROM log_entries",
        "CREATE INDEX registrations_by_fingerprint ON registrations (host_fingerprint, log_index)",
        """CREATE INDEX registrations_by_architecture
            ON registrations (architecture_digest, log_index)""",
        "CREATE INDEX registrations_by_owner ON registrations (owner, log_index)",
    )


def _host_blobs(integer: str, blob: str, *tuning: str) -> tuple[str, ...]:
    """Version 3: registered host models as sealed segments, one row each, beside their record.

    A host is sealed as a stream (`crypto.seal_stream`) whose header sits in the registration's
    ``host_envelope``; its segments, a megabyte or so each, are rows keyed by registration id
    and sequence number, written and read one at a time so that no model is ever held whole in
    memory or in one statement. `created_at` (first in the row, so reading it never touches the
    segment bytes) lets the store collect segments whose registration never committed.
    """
    return (
        f"""CREATE TABLE host_blobs (
            registration_id TEXT NOT NULL,
            seq {integer} NOT NULL CHECK (seq >= 0),
            created_at {integer} NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (registration_id, seq)
        )""",
        *tuning,
    )


_ONE_ACTIVE_PER_HOST = (
    # Two concurrent Registers of the same host can both pass the server's claim check; the
    # database, not a process-local lock, decides which one commits (the other's append fails
    # with a duplicate and answers ALREADY_EXISTS). Revoked records no longer block the host.
    """CREATE UNIQUE INDEX registrations_one_active_per_host
        ON registrations (host_fingerprint) WHERE revoked_at IS NULL""",
)


def _panel_members(integer: str, blob: str) -> tuple[str, ...]:
    """Version 5: the operator's reference panels, one row per member, by architecture family.

    The member's model is sealed as a stream whose segments live in host_blobs under the
    member id; removing a member only stops it joining later registrations (`removed_at`),
    since earlier receipts name panels that included it.
    """
    return (
        f"""CREATE TABLE panel_members (
            member_id TEXT PRIMARY KEY,
            family {blob} NOT NULL,
            fingerprint {blob} NOT NULL,
            label TEXT NOT NULL,
            added_at {integer} NOT NULL,
            key_version {integer} NOT NULL,
            envelope {blob} NOT NULL,
            removed_at {integer}
        )""",
        """CREATE UNIQUE INDEX panel_members_one_active_per_model
            ON panel_members (family, fingerprint) WHERE removed_at IS NULL""",
    )


_CHECKPOINT_NOTES = (
    # Checkpoints are derived data (a tree size's root and its last entry's time), so the
    # JSON-bodied ones are dropped and re-signed as C2SP notes, with the same roots, the
    # first time each size is asked for.
    "DELETE FROM checkpoints",
    "ALTER TABLE checkpoints DROP COLUMN signature",
    "ALTER TABLE checkpoints RENAME COLUMN body TO note",
)


def _entry_signatures(blob: str) -> tuple[str, ...]:
    """Version 7: each log entry's statement signature, stored with the entry (issue 18).

    A leaf hash only says a row is self-consistent; the signature says the TTP made it. An
    entry without one (every entry written before this version: they are not re-signed, since
    nothing can tell an old genuine row from a forged one) is a row the TTP never signed, and
    the server, its audit and every monitor refuse it.
    """
    return (
        "ALTER TABLE log_entries ADD COLUMN key_id TEXT",
        f"ALTER TABLE log_entries ADD COLUMN signature {blob}",
    )


def _disclosures(integer: str) -> tuple[str, ...]:
    """Version 8: which endpoint each output key's query set was sent to (issue 19).

    A set disclosed to one endpoint is burned for the others: the key server picks an unused
    set per endpoint, and the least-disclosed one when none is left. A disclosure is stored
    before the first query goes out, so a verification that is then refused (and signs
    nothing) still counts: the endpoint saw the queries.
    """
    return (
        f"""CREATE TABLE query_set_disclosures (
            registration_id TEXT NOT NULL REFERENCES registrations(registration_id),
            query_set INTEGER NOT NULL,
            endpoint TEXT NOT NULL,
            disclosed_at {integer} NOT NULL,
            PRIMARY KEY (registration_id, query_set, endpoint)
        )""",
    )


def _claim_signatures(blob: str) -> tuple[str, ...]:
    """Version 9: each registration's prior-claim signature, sealed, for the claim index
    (issue 21). A row of its own, written in the registration's transaction; `grp` is the
    index group (input kind and shape) in the clear, so the index is rebuilt per group."""
    return (
        f"""CREATE TABLE claim_signatures (
            registration_id TEXT PRIMARY KEY REFERENCES registrations (registration_id),
            grp {blob} NOT NULL,
            key_version INTEGER NOT NULL,
            envelope {blob} NOT NULL
        )""",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "principals, log entries, registrations, checkpoints",
        sqlite=_tables("BLOB", "INTEGER", "INTEGER", "length"),
        postgres=_tables("BYTEA", "BIGINT", "BOOLEAN", "octet_length"),
    ),
    Migration(
        2,
        "lookup indexes and the log head counter",
        sqlite=_head_and_indexes("INTEGER"),
        postgres=_head_and_indexes("BIGINT"),
    ),
    Migration(
        3,
        "host models as sealed segments",
        sqlite=_host_blobs("INTEGER", "BLOB"),
        # Ciphertext does not compress: EXTERNAL stores it out of line without trying.
        postgres=_host_blobs(
            "BIGINT", "BYTEA", "ALTER TABLE host_blobs ALTER COLUMN data SET STORAGE EXTERNAL"
        ),
    ),
    Migration(
        4,
        "at most one active registration per host fingerprint",
        sqlite=_ONE_ACTIVE_PER_HOST,
        postgres=_ONE_ACTIVE_PER_HOST,
    ),
    Migration(
        5,
        "operator reference panels by architecture family",
        sqlite=_panel_members("INTEGER", "BLOB"),
        postgres=_panel_members("BIGINT", "BYTEA"),
    ),
    Migration(
        6,
        "checkpoints as C2SP signed notes",
        sqlite=_CHECKPOINT_NOTES,
        postgres=_CHECKPOINT_NOTES,
    ),
    Migration(
        7,
        "statement signatures with the log entries",
        sqlite=_entry_signatures("BLOB"),
        postgres=_entry_signatures("BYTEA"),
    ),
    Migration(
        8,
        "output keys: query sets disclosed to endpoints",
        sqlite=_disclosures("INTEGER"),
        postgres=_disclosures("BIGINT"),
    ),
    Migration(
        9,
        "sealed prior-claim signatures for the claim index",
        sqlite=_claim_signatures("BLOB"),
        postgres=_claim_signatures("BYTEA"),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


def migrate(
    execute: Execute, backend: Backend, *, now: int, target: int = LATEST_VERSION
) -> list[int]:
    """Apply every missing migration up to `target`; return the versions applied.

    `execute` runs one statement inside the caller's transaction. `target` below the latest
    exists so that tests can build an old database and check the upgrade from it.
    """
    execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    )
    rows = execute("SELECT version FROM schema_migrations").fetchall()
    applied = {int(row["version"]) for row in rows}
    unknown = sorted(applied - {m.version for m in MIGRATIONS})
    if unknown:
        raise SchemaError(
            f"database has schema versions {unknown} that this code does not know;"
            " upgrade the server before opening it"
        )
    done: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in applied or migration.version > target:
            continue
        for statement in migration.statements(backend):
            execute(statement)
        execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now),
        )
        done.append(migration.version)
    return done
