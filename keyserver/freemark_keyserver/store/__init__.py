"""Storage for the key server: principals, registrations and the append-only log.

One `Store` interface with two backends: SQLite for a file path (the embedded default, one
server) and PostgreSQL for a ``postgresql://`` URL (several server replicas sharing one
database). Priority between rival registrations is decided by log order (DESIGN §1.2), so the
one thing every backend must get right is `Store.append`: log indexes form a single total order
across threads, processes and replicas, with no gaps, and a registration is committed in the
same transaction as its log entry, so neither can ever exist without the other.

The order comes from the database's own lock, never a Python lock, because a Python lock does
not reach another process or replica: the one-row ``log_head`` counter is incremented first
thing in every append transaction (under ``BEGIN IMMEDIATE`` on SQLite, a row lock on
PostgreSQL), so a second appender waits until the first commits or rolls back.

Envelopes and log entries are opaque bytes here: encryption, canonical JSON and Merkle proofs
live in `freemark_keyserver.crypto` and `freemark.merkle`.

Registered host models can be gigabytes, so they are not columns of the registration: their
sealed segments are rows of their own (`put_host_blob`), written before the registration that
refers to them, a few megabytes per transaction, and read back one segment at a time
(`host_blob`). Segments whose registration never committed (a crash, a failed append) are
invisible to every reader and are collected when a store opens, once they are older than
`ORPHAN_GRACE_S`.

Quick start::

    store = open_store("freemark.db")        # or "postgresql://user:pw@host/db"
    entry = store.append("register", lambda index, now: build_json(index, now), registration)
    assert store.get_registration(registration.registration_id).log_index == entry.index
    store.close()
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from freemark_keyserver.store.migrations import Backend

__all__ = [
    "ORPHAN_GRACE_S",
    "ROLES",
    "DuplicateError",
    "LogEntry",
    "NotFoundError",
    "Principal",
    "Registration",
    "Store",
    "StoreError",
    "StoredCheckpoint",
    "now_micros",
    "open_store",
]

ROLES = frozenset({"owner", "arbiter", "admin"})

# Rows fetched per round trip when iterating every registration for master key rotation:
# small enough to keep memory flat, large enough that the round trips do not dominate.
_REWRAP_BATCH = 256

_PAGE_TOKEN_PREFIX = b"freemark/v1/after:"

# Host segments committed per transaction: enough to amortise a commit's fsync, few enough that
# an SQLite writer holds the database lock (which appends also need) for milliseconds only.
_BLOB_TRANSACTION_BYTES = 16 << 20

# Host segments with no registration are collected once this old. A registration is appended
# moments after its last segment is written, so an hour is far beyond any write-to-append gap
# and a replica starting up never takes segments another replica is about to register.
ORPHAN_GRACE_S = 3600

Clock = Callable[[], int]


def now_micros() -> int:
    """Wall-clock time in unix microseconds: the resolution every stored timestamp uses."""
    return time.time_ns() // 1000


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Someone who may call the server: an owner, an arbiter or an admin.

    Only a hash of the bearer token is stored, so a leaked database does not leak credentials.
    """

    name: str
    role: str
    token_hash: bytes
    created_at: int
    disabled: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {sorted(ROLES)}")


@dataclass(frozen=True)
class Registration:
    """A registered key bundle: public lookup fields in the clear, secrets in envelopes.

    `created_at` (unix microseconds) and `log_index` are assigned by `Store.append`; whatever
    the caller puts there is ignored on insert. `host_envelope` holds what opens the registered
    host: a `crypto.StreamHeader` whose segments are this registration's host blob, or, for
    records written before schema version 3, the whole host sealed in one `crypto.Envelope`.
    """

    registration_id: str
    owner: str
    created_at: int
    host_fingerprint: bytes
    architecture_digest: bytes
    layer: str
    units: int
    n_bits: int
    commitment: bytes
    key_version: int
    envelope: bytes
    host_envelope: bytes
    log_index: int
    revoked_at: int | None = None


@dataclass(frozen=True)
class LogEntry:
    """One leaf of the append-only log: the exact bytes hashed, and where they sit."""

    index: int
    kind: str
    entry: bytes
    leaf_hash: bytes
    created_at: int


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as stored: the signed body bytes and the signature over them."""

    tree_size: int
    body: bytes
    signature: bytes


# --- errors --------------------------------------------------------------------------------


class StoreError(Exception):
    """The store cannot do what was asked (closed, schema too new, ...)."""


class DuplicateError(StoreError):
    """A record with the same unique key (name, token hash, registration id) already exists."""


class NotFoundError(StoreError):
    """The record to change does not exist."""


# --- the interface -------------------------------------------------------------------------


class Store(ABC):
    """Everything the server persists. Every method is thread-safe."""

    # principals

    @abstractmethod
    def add_principal(self, principal: Principal) -> None:
        """Add a principal; raise `DuplicateError` if its name or token hash is taken."""

    @abstractmethod
    def principal_by_token_hash(self, token_hash: bytes) -> Principal | None:
        """The principal holding this token hash, disabled or not (auth decides)."""

    @abstractmethod
    def principal_by_name(self, name: str) -> Principal | None:
        """The principal with this name, or None."""

    @abstractmethod
    def list_principals(self) -> list[Principal]:
        """Every principal, by name."""

    @abstractmethod
    def disable_principal(self, name: str) -> None:
        """Disable a principal for good; raise `NotFoundError` if there is none by that name.

        Principals are disabled, never deleted, so the owner named by old registrations and
        log entries always resolves.
        """

    # the log and registrations

    @abstractmethod
    def append(
        self,
        kind: str,
        build_entry: Callable[[int, int], bytes],
        registration: Registration | None = None,
    ) -> LogEntry:
        """Append one log entry, and a registration with it, in one transaction.

        Under the database's write lock: take the next index (the current tree size) and the
        time, call ``build_entry(index, now_micros)`` for the canonical entry bytes (the
        caller embeds both in the entry, so the signed entry and the row agree), store the
        entry with its RFC 6962 leaf hash and, if given, the registration with that
        `log_index` and `created_at`. Either all of it commits or none of it does; an
        exception from `build_entry` rolls everything back. Times never decrease along the
        log, even across replicas whose clocks disagree.
        """

    @abstractmethod
    def get_registration(self, registration_id: str) -> Registration | None:
        """The registration with this id, or None."""

    @abstractmethod
    def find_by_fingerprint(self, host_fingerprint: bytes) -> list[Registration]:
        """Registrations of this exact host model, earliest log entry first."""

    @abstractmethod
    def find_by_architecture(self, architecture_digest: bytes) -> list[Registration]:
        """Registrations of models with this architecture, earliest log entry first."""

    @abstractmethod
    def list_registrations(
        self, owner: str | None, page_size: int, page_token: str
    ) -> tuple[list[Registration], str]:
        """One page of registrations in log order, and the token for the next ("" at the end).

        `owner` None lists everyone's. Pagination is by key (log index), so pages stay
        correct while registrations are appended. A malformed token raises `ValueError`.
        """

    @abstractmethod
    def revoke(self, registration_id: str, at: int) -> bool:
        """Mark a registration revoked at `at`; False if it is absent or already revoked."""

    @abstractmethod
    def registrations_for_rewrap(self) -> Iterator[Registration]:
        """Every registration, revoked ones too, in log order, for master key rotation.

        Fetched in batches with no transaction held between them, so the caller may call
        `update_envelopes` while iterating.
        """

    @abstractmethod
    def update_envelopes(
        self, registration_id: str, key_version: int, envelope: bytes, host_envelope: bytes
    ) -> None:
        """Replace both envelopes and their key version atomically; `NotFoundError` if absent."""

    # host models

    @abstractmethod
    def put_host_blob(self, registration_id: str, segments: Iterable[bytes]) -> int:
        """Store a registration's sealed host segments, in order; return how many there were.

        Call it before the `append` that stores the registration. Segments are consumed
        lazily and committed a few megabytes per transaction, so neither the model nor the
        database's write lock is held for its whole length. Until the registration commits,
        no reader looks for them; if it never does, they are orphans for
        `collect_orphan_host_blobs`. `DuplicateError` if this id already has segments.
        """

    @abstractmethod
    def host_blob(self, registration_id: str) -> Iterator[bytes]:
        """A registration's host segments in order, each fetched when the iterator gets to it.

        Yields nothing for an id without segments; completeness is for the reader to check
        (the stream header knows the count, and `crypto.open_stream` refuses a short one).
        """

    @abstractmethod
    def host_blob_segments(self, registration_id: str) -> int:
        """How many host segments this id has, without reading them (for audits)."""

    @abstractmethod
    def collect_orphan_host_blobs(self, written_before: int) -> int:
        """Delete host blobs that no registration refers to and whose newest segment was
        written before `written_before` (unix microseconds); return how many blobs went."""

    @abstractmethod
    def tree_size(self) -> int:
        """How many entries the log holds."""

    @abstractmethod
    def entries(self, start: int, end: int) -> list[LogEntry]:
        """Entries with start <= index < end; `ValueError` if the range is not in the log."""

    @abstractmethod
    def leaf_hashes(self, end: int) -> list[bytes]:
        """Leaf hashes of the first `end` entries; `ValueError` if the log is shorter."""

    # checkpoints

    @abstractmethod
    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Store a signed checkpoint; the first one stored for a tree size is kept.

        Replicas may each sign the same tree size; both attest to the same tree, so a later
        one for a size already stored is not an error and is dropped.
        """

    @abstractmethod
    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest tree size, or None."""

    @abstractmethod
    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint, by tree size."""

    @abstractmethod
    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None:
        """The checkpoint of exactly this tree size, or None."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; later calls raise `StoreError`."""


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


# --- the shared SQL implementation ---------------------------------------------------------


def _leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash, SHA-256(0x00 || entry): the same as `freemark.merkle`."""
    return hashlib.sha256(b"\x00" + entry).digest()


def _encode_page_token(after_log_index: int) -> str:
    return base64.urlsafe_b64encode(_PAGE_TOKEN_PREFIX + str(after_log_index).encode()).decode()


def _decode_page_token(token: str) -> int:
    """The log index a page token resumes after; -1 for the first page."""
    if not token:
        return -1
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("invalid page token") from e
    digits = raw.removeprefix(_PAGE_TOKEN_PREFIX)
    if digits == raw or not digits.isdigit():
        raise ValueError("invalid page token")
    return int(digits)


_REGISTRATION_COLUMNS = (
    "registration_id, owner, created_at, host_fingerprint, architecture_digest, layer, units,"
    " n_bits, commitment, key_version, envelope, host_envelope, log_index, revoked_at"
)
_PRINCIPAL_COLUMNS = "name, role, token_hash, created_at, disabled"
_ENTRY_COLUMNS = "idx, kind, entry, leaf_hash, created_at"
_CHECKPOINT_COLUMNS = "tree_size, body, signature"


def _registration(row: Sequence[Any]) -> Registration:
    return Registration(*row)


def _principal(row: Sequence[Any]) -> Principal:
    name, role, token_hash, created_at, disabled = row
    return Principal(name, role, bytes(token_hash), created_at, bool(disabled))


def _entry(row: Sequence[Any]) -> LogEntry:
    return LogEntry(*row)


def _checkpoint(row: Sequence[Any]) -> StoredCheckpoint:
    return StoredCheckpoint(*row)


class _SqlStore(Store):
    """The SQL both backends share; subclasses supply connections, locking and dialect.

    Statements are written once, with ``?`` placeholders, against the schema in
    `freemark_keyserver.store.migrations`. Connections come from a small pool: each
    operation borrows one, so a connection is never used by two threads at once and their
    number is bounded by the number of concurrent callers, not of threads ever seen.
    """

    backend: ClassVar[Backend]

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._pool_lock = threading.Lock()
        self._idle: list[Any] = []
        self._closed = False

    # backend hooks

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection in autocommit mode; transactions are opened by `_begin`."""

    @abstractmethod
    def _begin(self, conn: Any) -> AbstractContextManager[None]:
        """A write transaction: commits on exit, rolls back on an exception.

        On SQLite it must take the database write lock up front (``BEGIN IMMEDIATE``);
        PostgreSQL gets its ordering from row locks taken inside the transaction.
        """

    @abstractmethod
    def _execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one ``?``-placeholder statement; return a DB-API cursor."""

    @abstractmethod
    def _is_duplicate(self, error: Exception) -> bool:
        """Whether a driver error is a unique-constraint violation."""

    @abstractmethod
    def _lock_schema(self, conn: Any) -> None:
        """Serialise schema migration between processes opening the same database at once."""

    def _reusable(self, conn: Any) -> bool:
        """Whether a connection that was just used may go back to the pool."""
        return True

    # plumbing

    def _open(self) -> None:
        """Migrate on open, so every later call sees the latest schema; then collect orphans."""
        # Imported here: migrations imports this package's errors.
        from freemark_keyserver.store import migrations

        with self._transaction() as conn:
            self._lock_schema(conn)
            migrations.migrate(
                lambda sql, params=(): self._execute(conn, sql, params),
                self.backend,
                now=self._clock(),
            )
        self.collect_orphan_host_blobs(self._clock() - ORPHAN_GRACE_S * 1_000_000)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._pool_lock:
            if self._closed:
                raise StoreError("store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._pool_lock:
                keep = not self._closed and self._reusable(conn)
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._connection() as conn:
            try:
                with self._begin(conn):
                    yield conn
            except Exception as e:
                if self._is_duplicate(e):
                    raise DuplicateError(str(e).splitlines()[0]) from e
                raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._connection() as conn:
            return list(self._execute(conn, sql, params).fetchall())

    def _write(self, sql: str, params: Sequence[Any]) -> int:
        """Run one modifying statement in its own transaction; return the rows it changed."""
        with self._transaction() as conn:
            return int(self._execute(conn, sql, params).rowcount)

    # principals

    def add_principal(self, principal: Principal) -> None:
        self._write(
            f"INSERT INTO principals ({_PRINCIPAL_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (
                principal.name,
                principal.role,
                principal.token_hash,
                principal.created_at,
                principal.disabled,
            ),
        )

    def principal_by_token_hash(self, token_hash: bytes) -> Principal | None:
        rows = self._rows(
            f"SELECT {_PRINCIPAL_COLUMNS} FROM principals WHERE token_hash = ?", (token_hash,)
        )
        return _principal(rows[0]) if rows else None

    def principal_by_name(self, name: str) -> Principal | None:
        rows = self._rows(f"SELECT {_PRINCIPAL_COLUMNS} FROM principals WHERE name = ?", (name,))
        return _principal(rows[0]) if rows else None

    def list_principals(self) -> list[Principal]:
        rows = self._rows(f"SELECT {_PRINCIPAL_COLUMNS} FROM principals ORDER BY name")
        return [_principal(row) for row in rows]

    def disable_principal(self, name: str) -> None:
        if not self._write("UPDATE principals SET disabled = ? WHERE name = ?", (True, name)):
            raise NotFoundError(f"no principal named {name!r}")

    # the log and registrations

    def append(
        self,
        kind: str,
        build_entry: Callable[[int, int], bytes],
        registration: Registration | None = None,
    ) -> LogEntry:
        with self._transaction() as conn:
            # The increment is the ordering point: it takes the log head's lock, and a
            # concurrent appender waits here until this transaction ends.
            (index,) = self._execute(
                conn, "UPDATE log_head SET size = size + 1 WHERE id = 1 RETURNING size - 1"
            ).fetchall()[0]
            previous = self._execute(
                conn, "SELECT created_at FROM log_entries WHERE idx = ?", (index - 1,)
            ).fetchall()
            now = max(self._clock(), previous[0][0] if previous else 0)
            entry = build_entry(index, now)
            if not isinstance(entry, bytes):
                raise TypeError(f"build_entry returned {type(entry).__name__}, not bytes")
            stored = LogEntry(index, kind, entry, _leaf_hash(entry), now)
            self._execute(
                conn,
                f"INSERT INTO log_entries ({_ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (stored.index, stored.kind, stored.entry, stored.leaf_hash, stored.created_at),
            )
            if registration is not None:
                r = registration
                self._execute(
                    conn,
                    f"INSERT INTO registrations ({_REGISTRATION_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.registration_id,
                        r.owner,
                        now,
                        r.host_fingerprint,
                        r.architecture_digest,
                        r.layer,
                        r.units,
                        r.n_bits,
                        r.commitment,
                        r.key_version,
                        r.envelope,
                        r.host_envelope,
                        index,
                        r.revoked_at,
                    ),
                )
        return stored

    def get_registration(self, registration_id: str) -> Registration | None:
        rows = self._rows(
            f"SELECT {_REGISTRATION_COLUMNS} FROM registrations WHERE registration_id = ?",
            (registration_id,),
        )
        return _registration(rows[0]) if rows else None

    def find_by_fingerprint(self, host_fingerprint: bytes) -> list[Registration]:
        rows = self._rows(
            f"SELECT {_REGISTRATION_COLUMNS} FROM registrations"
            " WHERE host_fingerprint = ? ORDER BY log_index",
            (host_fingerprint,),
        )
        return [_registration(row) for row in rows]

    def find_by_architecture(self, architecture_digest: bytes) -> list[Registration]:
        rows = self._rows(
            f"SELECT {_REGISTRATION_COLUMNS} FROM registrations"
            " WHERE architecture_digest = ? ORDER BY log_index",
            (architecture_digest,),
        )
        return [_registration(row) for row in rows]

    def list_registrations(
        self, owner: str | None, page_size: int, page_token: str
    ) -> tuple[list[Registration], str]:
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        after = _decode_page_token(page_token)
        # One row more than asked tells whether another page exists, so the last page
        # ends with "" instead of a token that leads to an empty page.
        if owner is None:
            sql = "WHERE log_index > ? ORDER BY log_index LIMIT ?"
            params: tuple[Any, ...] = (after, page_size + 1)
        else:
            sql = "WHERE owner = ? AND log_index > ? ORDER BY log_index LIMIT ?"
            params = (owner, after, page_size + 1)
        rows = self._rows(f"SELECT {_REGISTRATION_COLUMNS} FROM registrations {sql}", params)
        page = [_registration(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        return page, _encode_page_token(page[-1].log_index) if more else ""

    def revoke(self, registration_id: str, at: int) -> bool:
        changed = self._write(
            "UPDATE registrations SET revoked_at = ?"
            " WHERE registration_id = ? AND revoked_at IS NULL",
            (at, registration_id),
        )
        return changed == 1

    def registrations_for_rewrap(self) -> Iterator[Registration]:
        token = ""
        while True:
            page, token = self.list_registrations(None, _REWRAP_BATCH, token)
            yield from page
            if not token:
                return

    def update_envelopes(
        self, registration_id: str, key_version: int, envelope: bytes, host_envelope: bytes
    ) -> None:
        changed = self._write(
            "UPDATE registrations SET key_version = ?, envelope = ?, host_envelope = ?"
            " WHERE registration_id = ?",
            (key_version, envelope, host_envelope, registration_id),
        )
        if not changed:
            raise NotFoundError(f"no registration {registration_id!r}")

    # host models

    def put_host_blob(self, registration_id: str, segments: Iterable[bytes]) -> int:
        pending = iter(segments)
        seq = 0
        more = True
        while more:
            with self._transaction() as conn:
                written = 0
                while written < _BLOB_TRANSACTION_BYTES:
                    segment = next(pending, None)
                    if segment is None:
                        more = False
                        break
                    self._execute(
                        conn,
                        "INSERT INTO host_blobs (registration_id, seq, created_at, data)"
                        " VALUES (?, ?, ?, ?)",
                        (registration_id, seq, self._clock(), segment),
                    )
                    seq += 1
                    written += len(segment)
        return seq

    def host_blob(self, registration_id: str) -> Iterator[bytes]:
        # One query per segment: a single result set would be fetched whole by psycopg's
        # client-side cursor, the whole model in memory.
        seq = 0
        while rows := self._rows(
            "SELECT data FROM host_blobs WHERE registration_id = ? AND seq = ?",
            (registration_id, seq),
        ):
            yield bytes(rows[0][0])
            seq += 1

    def host_blob_segments(self, registration_id: str) -> int:
        rows = self._rows(
            "SELECT COUNT(*) FROM host_blobs WHERE registration_id = ?", (registration_id,)
        )
        return int(rows[0][0])

    def collect_orphan_host_blobs(self, written_before: int) -> int:
        with self._transaction() as conn:
            orphans = self._execute(
                conn,
                "SELECT registration_id FROM host_blobs b WHERE NOT EXISTS"
                " (SELECT 1 FROM registrations r WHERE r.registration_id = b.registration_id)"
                " GROUP BY registration_id HAVING MAX(created_at) < ?",
                (written_before,),
            ).fetchall()
            for (registration_id,) in orphans:
                self._execute(
                    conn, "DELETE FROM host_blobs WHERE registration_id = ?", (registration_id,)
                )
        return len(orphans)

    def tree_size(self) -> int:
        return int(self._rows("SELECT size FROM log_head WHERE id = 1")[0][0])

    def entries(self, start: int, end: int) -> list[LogEntry]:
        if not 0 <= start <= end:
            raise ValueError(f"invalid entry range [{start}, {end})")
        rows = self._rows(
            f"SELECT {_ENTRY_COLUMNS} FROM log_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, end),
        )
        # Indexes have no gaps, so a short answer means the range runs past the log's end.
        if len(rows) != end - start:
            raise ValueError(f"log has no entries [{start}, {end}): it holds {len(rows)}")
        return [_entry(row) for row in rows]

    def leaf_hashes(self, end: int) -> list[bytes]:
        if end < 0:
            raise ValueError(f"invalid tree size {end}")
        rows = self._rows("SELECT leaf_hash FROM log_entries WHERE idx < ? ORDER BY idx", (end,))
        if len(rows) != end:
            raise ValueError(f"log holds {len(rows)} entries, fewer than {end}")
        return [bytes(row[0]) for row in rows]

    # checkpoints

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        self._write(
            f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?, ?)"
            " ON CONFLICT (tree_size) DO NOTHING",
            (checkpoint.tree_size, checkpoint.body, checkpoint.signature),
        )

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        rows = self._rows(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        )
        return _checkpoint(rows[0]) if rows else None

    def checkpoints(self) -> list[StoredCheckpoint]:
        rows = self._rows(f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size")
        return [_checkpoint(row) for row in rows]

    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None:
        rows = self._rows(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE tree_size = ?", (tree_size,)
        )
        return _checkpoint(rows[0]) if rows else None

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
