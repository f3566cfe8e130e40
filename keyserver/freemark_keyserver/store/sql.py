"""The SQL both backends share: every `Store` method, written once.

Statements use ``?`` placeholders against the schema in `freemark_keyserver.store.migrations`;
a backend supplies connections, transactions, locking and its dialect's quirks (`SqlStore`'s
hooks). Rows are read by column name, never by position: each backend's connections return
mapping rows (``sqlite3.Row``, psycopg's ``dict_row``), so a reordered column list cannot
silently shift a value into the wrong field.

The log's total order comes from the database's own lock, never a Python lock, because a
Python lock does not reach another process or replica: the one-row ``log_head`` counter is
incremented first thing in every append transaction (under ``BEGIN IMMEDIATE`` on SQLite, a
row lock on PostgreSQL), so a second appender waits until the first commits or rolls back.
"""

from __future__ import annotations

import base64
import binascii
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

from freemark_keyserver.store import migrations
from freemark_keyserver.store.errors import DuplicateError, NotFoundError
from freemark_keyserver.store.interface import ORPHAN_GRACE_S, Store
from freemark_keyserver.store.migrations import Backend
from freemark_keyserver.store.pool import ConnectionPool
from freemark_keyserver.store.records import (
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
)

__all__ = ["Row", "SqlStore"]

# A result row as every backend returns it: values by column name.
Row = Mapping[str, Any]

# Rows fetched per round trip when iterating every registration for master key rotation:
# small enough to keep memory flat, large enough that the round trips do not dominate.
_REWRAP_BATCH = 256

_PAGE_TOKEN_PREFIX = b"freemark/v1/after:"

# Host segments committed per transaction: enough to amortise a commit's fsync, few enough that
# an SQLite writer holds the database lock (which appends also need) for milliseconds only.
_BLOB_TRANSACTION_BYTES = 16 << 20


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


# Column lists: the order here is only the order of the INSERT placeholders below; reads go
# by name.
_REGISTRATION_COLUMNS = (
    "registration_id, owner, created_at, host_fingerprint, architecture_digest, layer, units,"
    " n_bits, commitment, key_version, envelope, host_envelope, log_index, revoked_at"
)
_PRINCIPAL_COLUMNS = "name, role, token_hash, created_at, disabled"
_PANEL_COLUMNS = "member_id, family, fingerprint, label, added_at, key_version, envelope, removed_at"
_ENTRY_COLUMNS = "idx, kind, entry, leaf_hash, created_at, key_id, signature"
_CHECKPOINT_COLUMNS = "tree_size, note"
_INSERT_ENTRY = f"INSERT INTO log_entries ({_ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_REGISTRATION = (f"INSERT INTO registrations ({_REGISTRATION_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_CLAIM = ("INSERT INTO claim_signatures (registration_id, grp, key_version, envelope)"
                 " VALUES (?, ?, ?, ?)")


def _registration(row: Row) -> Registration:
    return Registration(
        registration_id=row["registration_id"],
        owner=row["owner"],
        created_at=row["created_at"],
        host_fingerprint=row["host_fingerprint"],
        architecture_digest=row["architecture_digest"],
        layer=row["layer"],
        units=row["units"],
        n_bits=row["n_bits"],
        commitment=row["commitment"],
        key_version=row["key_version"],
        envelope=row["envelope"],
        host_envelope=row["host_envelope"],
        log_index=row["log_index"],
        revoked_at=row["revoked_at"],
    )


def _panel_member(row: Row) -> PanelMember:
    return PanelMember(
        member_id=row["member_id"],
        family=bytes(row["family"]),
        fingerprint=bytes(row["fingerprint"]),
        label=row["label"],
        added_at=row["added_at"],
        key_version=row["key_version"],
        envelope=bytes(row["envelope"]),
        removed_at=row["removed_at"],
    )


def _principal(row: Row) -> Principal:
    return Principal(
        name=row["name"],
        role=row["role"],
        token_hash=bytes(row["token_hash"]),
        created_at=row["created_at"],
        disabled=bool(row["disabled"]),
    )


def _entry(row: Row) -> LogEntry:
    return LogEntry(
        index=row["idx"],
        kind=row["kind"],
        entry=row["entry"],
        leaf_hash=row["leaf_hash"],
        created_at=row["created_at"],
        key_id=row["key_id"] or "",  # NULL: a row written before version 7, or forged
        signature=bytes(row["signature"] or b""),
    )


def _checkpoint(row: Row) -> StoredCheckpoint:
    return StoredCheckpoint(tree_size=row["tree_size"], note=bytes(row["note"]))


class _Isolate(Exception):
    """The database refused a row of a batch: do the batch again, entry by entry."""


class _Stale(Exception):
    """A batch built ahead does not fit the log's head, or a row of it was refused: roll it
    back and take the general path (`SqlStore._append_reserved`)."""


class SqlStore(Store):
    """The SQL both backends share; subclasses supply connections, locking and dialect.

    Connections come from a `ConnectionPool`: each operation borrows one.
    """

    backend: ClassVar[Backend]

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._pool: ConnectionPool[Any] = ConnectionPool(self._connect, reusable=self._reusable)

    # backend hooks

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection in autocommit mode, returning rows by column name.

        Transactions are opened by `_begin`.
        """

    @abstractmethod
    def _begin(self, conn: Any) -> AbstractContextManager[Any]:
        """A write transaction: commits on exit, rolls back on an exception.

        On SQLite it must take the database write lock up front (``BEGIN IMMEDIATE``);
        PostgreSQL gets its ordering from row locks taken inside the transaction.
        """

    @abstractmethod
    def _execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one ``?``-placeholder statement; return a DB-API cursor of `Row`s."""

    @abstractmethod
    def _execute_many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one ``?``-placeholder statement for each of `rows`, in as few round trips as
        the driver allows."""

    @abstractmethod
    def _is_duplicate(self, error: Exception) -> bool:
        """Whether a driver error is a unique-constraint violation."""

    @abstractmethod
    def _lock_schema(self, conn: Any) -> None:
        """Serialise schema migration between processes opening the same database at once."""

    def _reusable(self, conn: Any) -> bool:
        """Whether a connection that was just used may go back to the pool."""
        return True

    def _pipeline(self, conn: Any) -> AbstractContextManager[Any]:
        """Statements sent without waiting for each one's answer, where the driver can: one
        round trip up to each row read, and one for the rest with the commit. A statement's
        error then surfaces at the next read or at the end of the block, not at the
        statement. SQLite runs in-process: nothing to save."""
        return nullcontext()

    # plumbing

    def _open(self) -> None:
        """Migrate on open, so every later call sees the latest schema; then collect orphans."""
        with self._transaction() as conn:
            self._lock_schema(conn)
            migrations.migrate(
                lambda sql, params=(): self._execute(conn, sql, params),
                self.backend,
                now=self._clock(),
            )
        self.collect_orphan_host_blobs(self._clock() - ORPHAN_GRACE_S * 1_000_000)

    @contextmanager
    def _transaction(self, *, pipelined: bool = False) -> Iterator[Any]:
        """A write transaction on a pooled connection; `pipelined` (`_pipeline`) for one
        whose statements need not fail one by one. The block's end is the commit: the
        caller may acknowledge what it wrote only once the block has exited."""
        with self._pool.connection() as conn:
            try:
                with self._pipeline(conn) if pipelined else nullcontext(), self._begin(conn):
                    yield conn
            except Exception as e:
                if self._is_duplicate(e):
                    raise DuplicateError(str(e).splitlines()[0]) from e
                raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._pool.connection() as conn:
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
        *,
        sign: EntrySigner | None = None,
    ) -> LogEntry:
        [result] = self.append_batch([Pending(kind, build_entry, registration)], sign=sign)
        if isinstance(result, Exception):
            raise result
        return result

    def append_batch(
        self,
        pending: Sequence[Pending],
        *,
        sign: EntrySigner | None = None,
        checkpoint: CheckpointSigner | None = None,
    ) -> list[LogEntry | Exception]:
        # A batch built ahead for the head it expects goes in as reserved (two round trips
        # on PostgreSQL), if the head is there. Otherwise the rows of a batch go in with one
        # statement per table (a round trip per table, not per entry); if the database
        # refuses any row, the batch is done again with each entry under a savepoint of its
        # own, so it fails alone.
        reserved = self._append_reserved(pending, checkpoint)
        if reserved is not None:
            return reserved
        try:
            return self._append_batch(pending, sign, checkpoint, isolate=len(pending) == 1)
        except _Isolate:
            return self._append_batch(pending, sign, checkpoint, isolate=True)

    def _append_reserved(self, pending: Sequence[Pending], checkpoint: CheckpointSigner | None
                         ) -> list[LogEntry | Exception] | None:
        """The batch as its entries were built (`Pending.built`), where they were built for
        consecutive indexes from the log's head and no later time precedes the first; None,
        with nothing written, anywhere else (some entry not built ahead, another replica
        appended first, a row refused): the caller then takes the general path.

        On PostgreSQL two round trips, pipelined: the head's row lock and its move to the
        batch's end from the size the batch was built for, every row, and the head read back
        (the ordering point and the rows' answers, before any checkpoint is signed over them:
        never over a batch the database refused or a head that moved); then the checkpoint
        with COMMIT. The general path needs a third, to read the head before building."""
        built = [item.built for item in pending]
        if not built or any(b is None for b in built):
            return None
        entries = [b for b in built if b is not None]
        start, end = entries[0].index, entries[0].index + len(entries)
        if [e.index for e in entries] != list(range(start, end)):
            return None
        try:
            with self._transaction(pipelined=True) as conn:
                try:
                    self._execute(conn, "UPDATE log_head SET size = ? WHERE id = 1 AND size = ?",
                                  (end, start))
                    self._insert_rows(conn, list(zip(pending, entries, strict=True)))
                    head = self._execute(
                        conn, "SELECT size, (SELECT created_at FROM log_entries WHERE idx = ?)"
                        " AS previous FROM log_head WHERE id = 1", (start - 1,)).fetchall()[0]
                except Exception as e:  # a row refused (or taken): the general path isolates
                    raise _Stale from e
                if head["size"] != end or (head["previous"] or 0) > entries[0].created_at:
                    raise _Stale  # not the head it was built for
                # From here on a failure is the batch's, as on the general path: the COMMIT
                # may have been sent, so the batch is not written again.
                if checkpoint is not None:
                    self._execute(
                        conn,
                        f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?)"
                        " ON CONFLICT (tree_size) DO NOTHING",
                        (end, checkpoint(start, entries)),
                    )
        except _Stale:  # rolled back before anything was signed over it
            return None
        return list(entries)

    def _append_batch(self, pending: Sequence[Pending], sign: EntrySigner | None,
                      checkpoint: CheckpointSigner | None, *, isolate: bool
                      ) -> list[LogEntry | Exception]:
        # Pipelined (`_pipeline`) unless entries must fail one by one under savepoints: on
        # PostgreSQL the batch is then three round trips, whatever its size: BEGIN with the
        # log head's row; every row with the new head; the checkpoint with COMMIT. A row
        # refused surfaces with the new head, so a batch of several is then done again entry
        # by entry (`_Isolate`); an entry alone fails as it would anyway.
        alone = len(pending) == 1
        try:
            return self._append_rows(pending, sign, checkpoint, isolate=isolate,
                                     pipelined=alone or not isolate)
        except Exception as e:
            if isolate:
                raise
            raise _Isolate from e

    def _append_rows(self, pending: Sequence[Pending], sign: EntrySigner | None,
                     checkpoint: CheckpointSigner | None, *, isolate: bool, pipelined: bool
                     ) -> list[LogEntry | Exception]:
        results: list[LogEntry | Exception] = []
        with self._transaction(pipelined=pipelined) as conn:
            # Taking the log head's row lock is the ordering point: a concurrent appender
            # (thread, process or replica) waits here until this transaction ends. One
            # statement reads the head and the last entry's time with it.
            head = self._execute(
                conn, "UPDATE log_head SET size = size WHERE id = 1 RETURNING size,"
                " (SELECT created_at FROM log_entries WHERE idx = log_head.size - 1)"
                " AS previous"
            ).fetchall()[0]
            size = head["size"]
            last = head["previous"] or 0  # each entry's time is at least its predecessor's
            now = self._clock()
            index = size
            built: list[tuple[Pending, LogEntry]] = []
            for item in pending:
                try:
                    stored = item.entry_at(index, now, last, sign)
                except Exception as e:  # noqa: BLE001 - this entry fails alone
                    results.append(e)
                    continue
                if isolate and len(pending) > 1:
                    self._execute(conn, "SAVEPOINT entry")
                    try:
                        self._insert_rows(conn, [(item, stored)])
                    except Exception as e:  # noqa: BLE001 - this entry fails alone
                        self._execute(conn, "ROLLBACK TO SAVEPOINT entry")
                        results.append(DuplicateError(str(e).splitlines()[0])
                                       if self._is_duplicate(e) else e)
                        continue
                    finally:
                        self._execute(conn, "RELEASE SAVEPOINT entry")
                results.append(stored)
                built.append((item, stored))
                index, last = index + 1, stored.created_at
            if not isolate:
                self._insert_rows(conn, built)  # a refusal: `_Isolate`, by the caller
            elif len(pending) == 1 and built:
                self._insert_rows(conn, built)  # alone: a failure rolls back all of it
            if index == size:
                return results
            # Read back (pipelined, the rows' answers come with it): every row is in before
            # a checkpoint is signed over them, never over a batch the database refused.
            self._execute(conn, "UPDATE log_head SET size = ? WHERE id = 1 RETURNING size",
                          (index,)).fetchall()
            if checkpoint is not None:
                note = checkpoint(size, [stored for _, stored in built])
                self._execute(
                    conn,
                    f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?)"
                    " ON CONFLICT (tree_size) DO NOTHING",
                    (index, note),
                )
        return results

    def _insert_rows(self, conn: Any, built: Sequence[tuple[Pending, LogEntry]]) -> None:
        """Insert built entries, their registrations and claim signatures: one statement per
        table for the lot."""
        entries = [(e.index, e.kind, e.entry, e.leaf_hash, e.created_at, e.key_id or None,
                    e.signature or None) for _, e in built]
        registrations = [
            (r.registration_id, r.owner, e.created_at, r.host_fingerprint,
             r.architecture_digest, r.layer, r.units, r.n_bits, r.commitment, r.key_version,
             r.envelope, r.host_envelope, e.index, r.revoked_at)
            for item, e in built if (r := item.registration) is not None]
        claims = [(c.registration_id, c.group, c.key_version, c.envelope)
                  for item, _ in built if (c := item.claim) is not None]
        for sql, rows in ((_INSERT_ENTRY, entries), (_INSERT_REGISTRATION, registrations),
                          (_INSERT_CLAIM, claims)):
            if rows:
                self._execute_many(conn, sql, rows)

    def now(self) -> int:
        return self._clock()

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

    # prior-claim signatures

    def claim_signatures(self, after_log_index: int = -1) -> list[ClaimSignature]:
        rows = self._rows(
            "SELECT c.registration_id, c.grp, c.key_version, c.envelope, r.owner, r.log_index"
            " FROM claim_signatures c JOIN registrations r"
            " ON r.registration_id = c.registration_id"
            " WHERE r.log_index > ? ORDER BY r.log_index",
            (after_log_index,),
        )
        return [ClaimSignature(row["registration_id"], bytes(row["grp"]), row["key_version"],
                               bytes(row["envelope"]), row["owner"], row["log_index"])
                for row in rows]

    def update_claim_envelope(self, registration_id: str, key_version: int, envelope: bytes
                              ) -> None:
        changed = self._write(
            "UPDATE claim_signatures SET key_version = ?, envelope = ? WHERE registration_id = ?",
            (key_version, envelope, registration_id),
        )
        if not changed:
            raise NotFoundError(f"no claim signature for {registration_id!r}")

    # the operator's reference panels

    def add_disclosure(self, registration_id: str, query_set: int, endpoint: str, at: int
                       ) -> None:
        self._write("INSERT INTO query_set_disclosures (registration_id, query_set, endpoint,"
                    " disclosed_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (registration_id, query_set, endpoint, at))

    def disclosures(self, registration_id: str) -> list[tuple[int, str]]:
        rows = self._rows("SELECT query_set, endpoint FROM query_set_disclosures"
                          " WHERE registration_id = ? ORDER BY disclosed_at, query_set",
                          (registration_id,))
        return [(int(row["query_set"]), str(row["endpoint"])) for row in rows]

    def add_panel_member(self, member: PanelMember) -> None:
        self._write(  # a second active copy of one model raises DuplicateError
            f"INSERT INTO panel_members ({_PANEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (member.member_id, member.family, member.fingerprint, member.label,
             member.added_at, member.key_version, member.envelope, member.removed_at),
        )

    def panel_members(self, family: bytes | None = None, *, active: bool = True
                      ) -> list[PanelMember]:
        clauses: list[str] = []
        params: list[Any] = []
        if family is not None:
            clauses.append("family = ?")
            params.append(family)
        if active:
            clauses.append("removed_at IS NULL")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"SELECT {_PANEL_COLUMNS} FROM panel_members{where}"
                          " ORDER BY added_at, member_id", params)
        return [_panel_member(row) for row in rows]

    def remove_panel_member(self, member_id: str, at: int) -> bool:
        changed = self._write(
            "UPDATE panel_members SET removed_at = ? WHERE member_id = ? AND removed_at IS NULL",
            (at, member_id),
        )
        return changed == 1

    def update_panel_envelope(self, member_id: str, key_version: int, envelope: bytes) -> None:
        changed = self._write(
            "UPDATE panel_members SET key_version = ?, envelope = ? WHERE member_id = ?",
            (key_version, envelope, member_id),
        )
        if not changed:
            raise NotFoundError(f"no panel member {member_id!r}")

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
            yield bytes(rows[0]["data"])
            seq += 1

    def host_blob_segments(self, registration_id: str) -> int:
        rows = self._rows(
            "SELECT COUNT(*) AS segments FROM host_blobs WHERE registration_id = ?",
            (registration_id,),
        )
        return int(rows[0]["segments"])

    def collect_orphan_host_blobs(self, written_before: int) -> int:
        with self._transaction() as conn:
            orphans = self._execute(
                conn,
                "SELECT registration_id FROM host_blobs b WHERE NOT EXISTS"
                " (SELECT 1 FROM registrations r WHERE r.registration_id = b.registration_id)"
                " AND NOT EXISTS"
                " (SELECT 1 FROM panel_members m WHERE m.member_id = b.registration_id)"
                " GROUP BY registration_id HAVING MAX(created_at) < ?",
                (written_before,),
            ).fetchall()
            for orphan in orphans:
                self._execute(
                    conn,
                    "DELETE FROM host_blobs WHERE registration_id = ?",
                    (orphan["registration_id"],),
                )
        return len(orphans)

    def tree_size(self) -> int:
        return int(self._rows("SELECT size FROM log_head WHERE id = 1")[0]["size"])

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
        return [bytes(row["leaf_hash"]) for row in rows]

    # checkpoints

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        self._write(
            f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?)"
            " ON CONFLICT (tree_size) DO NOTHING",
            (checkpoint.tree_size, checkpoint.note),
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
        self._pool.close()
