"""One contract for every store backend, run against a real SQLite file and a real PostgreSQL.

The backends share SQL but not locking, transactions or types, and those are where a log
store breaks: the suite therefore checks behaviour only through the `Store` interface (plus
raw SQL where a test must build an old schema or look at the migration table), and runs
unchanged on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, tuple_row

import freemark_keyserver.store.sql as store_sql
from freemark_keyserver.store import (
    ORPHAN_GRACE_S,
    DuplicateError,
    LogEntry,
    NotFoundError,
    PanelMember,
    Pending,
    Principal,
    Registration,
    Store,
    StoredCheckpoint,
    StoreError,
    open_store,
)
from freemark_keyserver.store.migrations import LATEST_VERSION, Backend, SchemaError, migrate

REPO = Path(__file__).resolve().parents[4]

T0 = 1_700_000_000_000_000  # a fixed unix time in microseconds


class FakeClock:
    """A clock that moves only when told to, so stored times can be checked exactly."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def entry_builder(kind: str, registration_id: str = "") -> Callable[[int, int], bytes]:
    """A `build_entry` that embeds index and time the way the service does."""

    def build(index: int, now: int) -> bytes:
        body = {"index": index, "time": now, "kind": kind, "registration_id": registration_id}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    return build


def make_registration(
    registration_id: str,
    *,
    owner: str = "alice",
    fingerprint: bytes | None = None,
    architecture: bytes = b"\x02" * 32,
) -> Registration:
    return Registration(
        registration_id=registration_id,
        owner=owner,
        created_at=0,
        host_fingerprint=fingerprint or hashlib.sha256(b"host-" + registration_id.encode()).digest(),
        architecture_digest=architecture,
        layer="features.3",
        units=128,
        n_bits=256,
        commitment=hashlib.sha256(registration_id.encode()).digest(),
        key_version=1,
        envelope=b"sealed-bundle-" + registration_id.encode(),
        host_envelope=b"sealed-host-" + registration_id.encode(),
        log_index=-1,
    )


def register(store: Store, registration: Registration) -> LogEntry:
    return store.append(
        "register", entry_builder("register", registration.registration_id), registration
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db: str, clock: FakeClock) -> Iterator[Store]:
    s = open_store(db, clock=clock)
    yield s
    s.close()


@contextmanager
def raw_sql(db: str, *, by_name: bool = False) -> Iterator[Callable[..., Any]]:
    """Run "?"-placeholder SQL on the test database directly, outside any `Store`.

    Rows are plain tuples, or with `by_name` mappings by column name as the stores' own
    connections return them (what `migrate` reads).
    """
    if db.startswith("postgresql://"):
        row_factory: Any = dict_row if by_name else tuple_row
        with psycopg.connect(db, autocommit=True, row_factory=row_factory) as pg_conn:
            yield lambda sql, params=(): pg_conn.execute(sql.replace("?", "%s"), params)
    else:
        sqlite_conn = sqlite3.connect(db, isolation_level=None)
        if by_name:
            sqlite_conn.row_factory = sqlite3.Row
        try:
            yield lambda sql, params=(): sqlite_conn.execute(sql, params)
        finally:
            sqlite_conn.close()


def assert_log_consistent(store: Store) -> list[LogEntry]:
    """Indexes 0..n-1 with true leaf hashes; register entries and registrations pair up 1:1."""
    size = store.tree_size()
    entries = store.entries(0, size)
    assert [e.index for e in entries] == list(range(size))
    registrations = {r.log_index: r for r in store.registrations_for_rewrap()}
    for e in entries:
        assert e.leaf_hash == hashlib.sha256(b"\x00" + e.entry).digest()
        body = json.loads(e.entry)
        assert (body["index"], body["time"]) == (e.index, e.created_at)
        if e.kind == "register":
            assert registrations.pop(e.index).registration_id == body["registration_id"]
    assert registrations == {}, "registrations without a log entry"
    assert [e.created_at for e in entries] == sorted(e.created_at for e in entries)
    return entries


# --- principals ----------------------------------------------------------------------------


def test_principals_add_find_list_disable(store: Store) -> None:
    bob = Principal("bob", "arbiter", b"h-bob", T0)
    alice = Principal("alice", "owner", b"h-alice", T0 + 1)
    store.add_principal(bob)
    store.add_principal(alice)

    assert store.principal_by_name("alice") == alice
    assert store.principal_by_token_hash(b"h-bob") == bob
    assert store.principal_by_name("carol") is None
    assert store.principal_by_token_hash(b"h-nobody") is None
    assert store.list_principals() == [alice, bob]

    store.disable_principal("bob")
    assert store.principal_by_token_hash(b"h-bob") == replace(bob, disabled=True)
    with pytest.raises(NotFoundError):
        store.disable_principal("carol")


def test_duplicate_principal_name_or_token_is_refused(store: Store) -> None:
    store.add_principal(Principal("alice", "owner", b"h-alice", T0))
    with pytest.raises(DuplicateError):
        store.add_principal(Principal("alice", "admin", b"h-other", T0))
    with pytest.raises(DuplicateError):
        store.add_principal(Principal("mallory", "owner", b"h-alice", T0))
    assert [p.name for p in store.list_principals()] == ["alice"]


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        Principal("eve", "root", b"h", T0)


# --- the log -------------------------------------------------------------------------------


def test_append_assigns_consecutive_indexes_and_rfc6962_leaf_hashes(
    store: Store, clock: FakeClock
) -> None:
    assert store.tree_size() == 0
    appended = []
    for i in range(5):
        clock.now = T0 + 10 * i
        appended.append(store.append("verify", entry_builder("verify")))

    assert [e.index for e in appended] == [0, 1, 2, 3, 4]
    assert [e.created_at for e in appended] == [T0 + 10 * i for i in range(5)]
    for e in appended:
        assert e.leaf_hash == hashlib.sha256(b"\x00" + e.entry).digest()
        assert json.loads(e.entry)["index"] == e.index
    assert store.tree_size() == 5
    assert store.entries(0, 5) == appended
    assert store.entries(1, 3) == appended[1:3]
    assert store.entries(5, 5) == []
    assert store.leaf_hashes(5) == [e.leaf_hash for e in appended]
    assert store.leaf_hashes(2) == [e.leaf_hash for e in appended[:2]]


def test_reading_past_the_end_of_the_log_raises(store: Store) -> None:
    store.append("verify", entry_builder("verify"))
    with pytest.raises(ValueError):
        store.entries(0, 2)
    with pytest.raises(ValueError):
        store.entries(1, 0)
    with pytest.raises(ValueError):
        store.leaf_hashes(2)


def test_log_times_never_decrease_when_the_clock_steps_back(store: Store, clock: FakeClock) -> None:
    first = store.append("verify", entry_builder("verify"))
    clock.now = T0 - 5_000_000  # another replica's clock, five seconds behind
    second = store.append("verify", entry_builder("verify"))
    assert second.created_at == first.created_at == T0
    assert json.loads(second.entry)["time"] == T0


def test_registration_is_stored_with_its_entry(store: Store, clock: FakeClock) -> None:
    store.append("verify", entry_builder("verify"))
    clock.now = T0 + 42
    reg = make_registration("reg-1")
    entry = register(store, reg)

    stored = store.get_registration("reg-1")
    assert stored == replace(reg, log_index=entry.index, created_at=T0 + 42)
    assert entry.index == 1 and entry.kind == "register"
    assert store.get_registration("reg-404") is None


def test_an_entry_is_stored_with_its_statement_signature(store: Store) -> None:
    """The signature is made from the exact entry bytes inside the append and read back with
    the entry (issue 18): a row without one reads back with none, never with a neighbour's."""
    signed: list[bytes] = []

    def sign(entry: bytes) -> tuple[str, bytes]:
        signed.append(entry)
        return "k" * 16, hashlib.sha512(entry).digest()

    first = store.append("verify", entry_builder("verify"), sign=sign)
    second = store.append("verify", entry_builder("verify"))
    third = register(store, make_registration("reg-1"))
    fourth = store.append("verify", entry_builder("verify"), sign=sign)
    assert signed == [first.entry, fourth.entry]
    assert (first.key_id, first.signature) == ("k" * 16, hashlib.sha512(first.entry).digest())
    assert (second.key_id, second.signature) == (third.key_id, third.signature) == ("", b"")
    assert store.entries(0, 4) == [first, second, third, fourth]

    def refuse(entry: bytes) -> tuple[str, bytes]:
        raise RuntimeError("no key")

    with pytest.raises(RuntimeError, match="no key"):  # a failed signature stores nothing
        store.append("register", entry_builder("register", "reg-2"), make_registration("reg-2"),
                     sign=refuse)
    assert store.tree_size() == 4 and store.get_registration("reg-2") is None


def test_lookups_by_fingerprint_and_architecture_are_in_log_order(store: Store) -> None:
    shared_arch = b"\xaa" * 32
    for i, fingerprint in enumerate([b"\x10" * 32, b"\x11" * 32, b"\x10" * 32]):
        if i == 2:  # only one active registration per host: the first must be revoked
            assert store.revoke("reg-0", at=1)
        register(
            store,
            make_registration(f"reg-{i}", fingerprint=fingerprint, architecture=shared_arch),
        )
    register(store, make_registration("reg-other", architecture=b"\xbb" * 32))

    assert [r.registration_id for r in store.find_by_fingerprint(b"\x10" * 32)] == [
        "reg-0",
        "reg-2",
    ]
    assert [r.registration_id for r in store.find_by_architecture(shared_arch)] == [
        "reg-0",
        "reg-1",
        "reg-2",
    ]
    assert store.find_by_fingerprint(b"\x99" * 32) == []


def test_failure_inside_build_entry_leaves_nothing(store: Store) -> None:
    def explode(index: int, now: int) -> bytes:
        raise RuntimeError("canonicalisation failed")

    with pytest.raises(RuntimeError, match="canonicalisation"):
        store.append("register", explode, make_registration("reg-1"))
    assert store.tree_size() == 0
    assert store.get_registration("reg-1") is None

    # The rolled-back index is not skipped: the next append takes it.
    assert register(store, make_registration("reg-1")).index == 0
    assert_log_consistent(store)


def test_duplicate_registration_rolls_back_its_entry(store: Store) -> None:
    register(store, make_registration("reg-1"))
    with pytest.raises(DuplicateError):
        register(store, make_registration("reg-1", owner="mallory"))
    assert store.tree_size() == 1
    assert store.get_registration("reg-1").owner == "alice"  # type: ignore[union-attr]
    assert_log_consistent(store)


def test_a_batch_commits_together_and_an_entry_that_fails_fails_alone(store: Store) -> None:
    register(store, make_registration("reg-1"))

    def explode(index: int, now: int) -> bytes:
        raise RuntimeError("canonicalisation failed")

    seen: list[tuple[int, list[int]]] = []

    def checkpoint(size: int, entries: Sequence[LogEntry]) -> bytes:
        seen.append((size, [e.index for e in entries]))
        return b"note over %d" % (size + len(entries))

    results = store.append_batch([
        Pending("register", entry_builder("register", "reg-2"), make_registration("reg-2")),
        Pending("register", explode, make_registration("reg-3")),
        Pending("register", entry_builder("register", "reg-1"), make_registration("reg-1")),
        Pending("verify", entry_builder("verify")),
    ], checkpoint=checkpoint)
    assert [type(r).__name__ for r in results] == ["LogEntry", "RuntimeError", "DuplicateError",
                                                   "LogEntry"]
    assert [r.index for r in results if isinstance(r, LogEntry)] == [1, 2]
    assert seen == [(1, [1, 2])]  # one checkpoint, over the tree after the batch
    assert store.checkpoint_at(3) == StoredCheckpoint(3, b"note over 3")
    assert store.get_registration("reg-3") is None and store.tree_size() == 3
    assert_log_consistent(store)


def test_an_entry_built_beforehand_is_stored_only_at_its_index_and_time(
        store: Store, clock: FakeClock) -> None:
    """The sequencer reserves an index and a time and builds and signs the entry before the
    transaction (`Pending.built`, `Pending.at`). The store keeps such an entry only where the
    index it gets is the one it was built for and its predecessor is no later; anywhere else
    it is built again at the log's own head, at its reserved time or its predecessor's, so a
    wrong guess costs time, never the log's order or a time that goes backwards."""
    register(store, make_registration("reg-1"))  # index 0, at T0
    clock.now = T0 + 10

    def ahead(kind: str, index: int, at: int) -> Pending:
        pending = Pending(kind, entry_builder(kind))
        return replace(pending, built=pending.build(index, at, None), at=at)

    batch = [
        ahead("kept", 1, T0 + 5),    # the index it gets, after its predecessor: kept as built
        ahead("stale", 1, T0 + 6),   # built for index 1, which the entry before it took
        ahead("early", 3, T0 + 4),   # the right index, but earlier than its predecessor
        ahead("later", 4, T0 + 20),  # the right index, later: kept, even past the clock
        Pending("plain", entry_builder("plain")),  # nothing reserved: built at the clock's
    ]
    results = store.append_batch(batch)
    assert [(r.index, r.created_at) for r in results if isinstance(r, LogEntry)] == [
        (1, T0 + 5), (2, T0 + 6), (3, T0 + 6), (4, T0 + 20), (5, T0 + 20)]
    assert [r is p.built for r, p in zip(results, batch, strict=True)] == [
        True, False, False, True, False]
    assert [e.kind for e in assert_log_consistent(store)] == [
        "register", "kept", "stale", "early", "later", "plain"]


def test_a_batch_built_ahead_goes_in_as_built_only_at_the_head_it_was_built_for(
        store: Store, clock: FakeClock) -> None:
    """The sequencer's steady state: a whole batch built ahead for the head it expects goes
    in as built, with its checkpoint (two round trips on PostgreSQL). Built for a head that
    has since moved, or holding a row the database refuses, it is rolled back before any
    checkpoint is signed over it and goes the general way: built again, each refusal alone."""
    register(store, make_registration("reg-1"))  # index 0, at T0

    def ahead(index: int, registration: str = "") -> Pending:
        kind = "register" if registration else "verify"
        pending = Pending(kind, entry_builder(kind, registration),
                          make_registration(registration) if registration else None)
        return replace(pending, built=pending.build(index, T0 + index, None), at=T0 + index)

    seen: list[tuple[int, list[int]]] = []

    def checkpoint(size: int, entries: Sequence[LogEntry]) -> bytes:
        seen.append((size, [e.index for e in entries]))
        return b"note over %d" % (size + len(entries))

    fits = [ahead(1), ahead(2, "reg-2")]
    assert [r is p.built for r, p in zip(store.append_batch(fits, checkpoint=checkpoint),
                                         fits, strict=True)] == [True, True]
    moved = [ahead(2), ahead(3)]  # built for a head of 2; the log holds 3
    assert [(r.index, r is p.built) for r, p in zip(
        store.append_batch(moved, checkpoint=checkpoint), moved, strict=True)
        if isinstance(r, LogEntry)] == [(3, False), (4, False)]
    refused = [ahead(5), ahead(6, "reg-1"), ahead(7)]  # reg-1 is registered already
    results = store.append_batch(refused, checkpoint=checkpoint)
    assert [type(r).__name__ for r in results] == ["LogEntry", "DuplicateError", "LogEntry"]
    assert [r.index for r in results if isinstance(r, LogEntry)] == [5, 6]
    assert seen == [(1, [1, 2]), (3, [3, 4]), (5, [5, 6])]  # never over a refused batch
    assert [c.tree_size for c in store.checkpoints()] == [3, 5, 7]
    assert store.get_registration("reg-2").log_index == 2  # type: ignore[union-attr]
    assert_log_consistent(store)


def test_a_batch_whose_checkpoint_fails_leaves_nothing(store: Store) -> None:
    def refuse(size: int, entries: Sequence[LogEntry]) -> bytes:
        raise RuntimeError("no checkpoint")

    with pytest.raises(RuntimeError, match="no checkpoint"):
        store.append_batch([Pending("verify", entry_builder("verify"))], checkpoint=refuse)
    assert store.tree_size() == 0 and store.latest_checkpoint() is None


# --- listing, revocation, rotation -----------------------------------------------------------


def test_one_active_registration_per_host(store: Store) -> None:
    register(store, make_registration("reg-a", fingerprint=b"\x42" * 32))
    with pytest.raises(DuplicateError):
        register(store, make_registration("reg-b", fingerprint=b"\x42" * 32))
    assert store.get_registration("reg-b") is None and store.tree_size() == 1
    assert store.revoke("reg-a", at=5)
    register(store, make_registration("reg-c", fingerprint=b"\x42" * 32))
    assert store.tree_size() == 2


def test_pagination_is_by_owner_and_in_log_order(store: Store) -> None:
    for i in range(25):
        register(store, make_registration(f"a-{i:02d}", owner="alice"))
        if i % 3 == 0:
            register(store, make_registration(f"b-{i:02d}", owner="bob"))

    pages = []
    token = ""
    while True:
        page, token = store.list_registrations("alice", 10, token)
        pages.append(page)
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    ids = [r.registration_id for p in pages for r in p]
    assert ids == [f"a-{i:02d}" for i in range(25)]

    bob, token = store.list_registrations("bob", 100, "")
    assert token == ""
    assert [r.registration_id for r in bob] == [f"b-{i:02d}" for i in range(0, 25, 3)]
    assert {r.owner for r in bob} == {"bob"}

    everyone, token = store.list_registrations(None, 100, "")
    assert len(everyone) == 34 and token == ""
    assert [r.log_index for r in everyone] == list(range(34))
    assert store.list_registrations("carol", 10, "") == ([], "")


@pytest.mark.parametrize("token", ["not-a-token", "Zm9v", "%%%"])
def test_malformed_page_token_is_refused(store: Store, token: str) -> None:
    with pytest.raises(ValueError, match="page token"):
        store.list_registrations(None, 10, token)


def test_page_size_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError, match="page_size"):
        store.list_registrations(None, 0, "")


def test_revoke_once(store: Store) -> None:
    register(store, make_registration("reg-1"))
    assert store.revoke("reg-1", T0 + 99) is True
    assert store.revoke("reg-1", T0 + 100) is False
    assert store.revoke("reg-404", T0) is False
    assert store.get_registration("reg-1").revoked_at == T0 + 99  # type: ignore[union-attr]


def test_envelopes_are_rewrapped_in_place(store: Store) -> None:
    for i in range(3):
        register(store, make_registration(f"reg-{i}"))
    store.revoke("reg-1", T0)

    seen = []
    for reg in store.registrations_for_rewrap():
        seen.append(reg.registration_id)
        store.update_envelopes(
            reg.registration_id, 2, b"v2-" + reg.envelope, b"v2-" + reg.host_envelope
        )
    assert seen == ["reg-0", "reg-1", "reg-2"]  # revoked ones too: the old key is retired

    rewrapped = store.get_registration("reg-1")
    assert rewrapped is not None
    assert (rewrapped.key_version, rewrapped.envelope, rewrapped.host_envelope) == (
        2,
        b"v2-sealed-bundle-reg-1",
        b"v2-sealed-host-reg-1",
    )
    assert rewrapped.revoked_at == T0
    with pytest.raises(NotFoundError):
        store.update_envelopes("reg-404", 2, b"", b"")


# --- host blobs ----------------------------------------------------------------------------


def segments_of(name: str, count: int) -> list[bytes]:
    return [f"{name}:{seq}:".encode() + bytes([seq % 256]) * 300 for seq in range(count)]


def test_host_blob_round_trips_in_order_across_transactions(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny transactions, so a handful of segments spans several of them.
    monkeypatch.setattr(store_sql, "_BLOB_TRANSACTION_BYTES", 1000)
    pieces = segments_of("reg-1", 11)
    assert store.put_host_blob("reg-1", iter(pieces)) == 11
    assert list(store.host_blob("reg-1")) == pieces
    assert store.host_blob_segments("reg-1") == 11
    assert list(store.host_blob("reg-404")) == []
    assert store.host_blob_segments("reg-404") == 0
    with pytest.raises(DuplicateError):
        store.put_host_blob("reg-1", iter(segments_of("again", 1)))
    assert list(store.host_blob("reg-1")) == pieces


def blob_file(db: str, blob_id: str) -> Path:
    """Where a SQLite store keeps a host blob: a file beside the database."""
    return Path(db + "-blobs") / (blob_id.encode().hex() + ".blob")


def test_host_blob_is_read_lazily(store: Store, db: str) -> None:
    store.put_host_blob("reg-1", segments_of("reg-1", 3))
    reader = store.host_blob("reg-1")
    assert next(reader) == segments_of("reg-1", 1)[0]
    # A segment not yet fetched when the blob changes under the reader is read as it is then.
    if db.startswith("postgresql://"):
        with raw_sql(db) as execute:
            execute("UPDATE host_blobs SET data = ? WHERE seq = 1", (b"changed",))
        assert list(reader) == [b"changed", segments_of("reg-1", 3)[2]]
    else:  # a file: the same length rewritten in place under the open reader
        path, first = blob_file(db, "reg-1"), segments_of("reg-1", 1)[0]
        second = segments_of("reg-1", 3)[1]
        with path.open("r+b") as handle:
            handle.seek(4 + len(first) + 4)
            handle.write(b"X" * len(second))
        assert list(reader) == [b"X" * len(second), segments_of("reg-1", 3)[2]]


def test_sqlite_keeps_host_blobs_as_files_beside_the_database_and_reads_older_rows(
    db: str, clock: FakeClock
) -> None:
    """A SQLite store writes each blob once, as a file (not twice through its write-ahead
    log); blobs that an older server wrote as `host_blobs` rows are still read, counted,
    refused as duplicates and collected. PostgreSQL keeps its blobs in the table, where
    every replica reads them."""
    store = open_store(db, clock=clock)
    try:
        store.put_host_blob("reg-new", segments_of("reg-new", 3))
        with raw_sql(db) as execute:
            rows = execute("SELECT COUNT(*) FROM host_blobs").fetchone()[0]
            for seq, segment in enumerate(segments_of("reg-old", 2)):
                execute("INSERT INTO host_blobs (registration_id, seq, created_at, data)"
                        " VALUES (?, ?, ?, ?)", ("reg-old", seq, T0, segment))
        if db.startswith("postgresql://"):
            assert rows == 3
            return
        assert rows == 0 and blob_file(db, "reg-new").is_file()
        assert list(store.host_blob("reg-new")) == segments_of("reg-new", 3)
        assert list(store.host_blob("reg-old")) == segments_of("reg-old", 2)
        assert store.host_blob_segments("reg-old") == 2
        with pytest.raises(DuplicateError):
            store.put_host_blob("reg-old", iter(segments_of("again", 1)))
        # What a writer killed mid-write leaves: a partial file, collected once as old.
        partial = blob_file(db, "x").with_name(".partial-0123")
        partial.write_bytes(b"sealed bytes")
        os.utime(partial, ns=(T0 * 1000, T0 * 1000))
        clock.now = T0 + ORPHAN_GRACE_S * 1_000_000 + 1
        assert store.collect_orphan_host_blobs(clock.now) == 2  # one file, one set of rows
        assert not blob_file(db, "reg-new").exists() and store.host_blob_segments("reg-old") == 0
        assert not partial.exists()
    finally:
        store.close()


def test_orphaned_host_blobs_are_collected_after_the_grace_period(
    db: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_sql, "_BLOB_TRANSACTION_BYTES", 1000)
    store = open_store(db, clock=clock)
    try:
        # A blob whose registration committed, one whose append never came, and one whose
        # writer died half-way (its source raised after some transactions had committed).
        store.put_host_blob("reg-kept", segments_of("reg-kept", 2))
        register(store, make_registration("reg-kept"))
        store.put_host_blob("reg-orphan", segments_of("reg-orphan", 2))

        def dies_half_way() -> Iterator[bytes]:
            yield from segments_of("reg-half", 7)
            raise OSError("the writer died")

        with pytest.raises(OSError):
            store.put_host_blob("reg-half", dies_half_way())
        # Rows commit a few at a time, so some are left; a file is removed by its writer.
        assert store.host_blob_segments("reg-half") < 7

        clock.now = T0 + (ORPHAN_GRACE_S - 1) * 1_000_000
        store.put_host_blob("reg-young", segments_of("reg-young", 1))  # another replica's
        assert store.collect_orphan_host_blobs(T0) == 0  # nothing is older than T0
    finally:
        store.close()

    clock.now = T0 + ORPHAN_GRACE_S * 1_000_000 + 1
    reopened = open_store(db, clock=clock)  # collects on open
    try:
        assert reopened.host_blob_segments("reg-orphan") == 0
        assert reopened.host_blob_segments("reg-half") == 0
        assert list(reopened.host_blob("reg-kept")) == segments_of("reg-kept", 2)
        assert reopened.host_blob_segments("reg-young") == 1  # within its grace period
        assert reopened.collect_orphan_host_blobs(clock.now) == 1  # now "reg-young" goes too
        assert reopened.host_blob_segments("reg-young") == 0
    finally:
        reopened.close()


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoints(store: Store) -> None:
    assert store.latest_checkpoint() is None
    assert store.checkpoints() == []
    cps = [StoredCheckpoint(size, f"note-{size}".encode()) for size in (4, 0, 9)]
    for cp in cps:
        store.add_checkpoint(cp)

    # A second checkpoint for a size already stored (another replica's) is dropped.
    store.add_checkpoint(StoredCheckpoint(4, b"note-4-again"))

    assert store.checkpoints() == sorted(cps, key=lambda c: c.tree_size)
    assert store.latest_checkpoint() == cps[2]
    assert store.checkpoint_at(4) == cps[0]
    assert store.checkpoint_at(5) is None


# --- migrations ----------------------------------------------------------------------------


def test_migrations_are_recorded_and_idempotent(db: str, clock: FakeClock) -> None:
    first = open_store(db, clock=clock)
    register(first, make_registration("reg-1"))
    first.close()
    second = open_store(db, clock=clock)  # opening again applies nothing
    assert second.tree_size() == 1
    second.close()

    with raw_sql(db) as execute:
        rows = execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        assert rows.fetchall() == [(v, T0) for v in range(1, LATEST_VERSION + 1)]


def test_upgrade_from_v1_keeps_data_and_continues_the_log(db: str, clock: FakeClock) -> None:
    backend: Backend = "postgres" if db.startswith("postgresql://") else "sqlite"
    reg = make_registration("reg-old")
    old_entries = [entry_builder("register", "reg-old")(0, T0)] + [
        entry_builder("verify")(i, T0 + i) for i in (1, 2)
    ]
    with raw_sql(db, by_name=True) as execute:
        assert migrate(execute, backend, now=T0, target=1) == [1]
        for i, entry in enumerate(old_entries):
            execute(
                "INSERT INTO log_entries (idx, kind, entry, leaf_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    i,
                    "register" if i == 0 else "verify",
                    entry,
                    hashlib.sha256(b"\x00" + entry).digest(),
                    T0 + i,
                ),
            )
        execute(
            "INSERT INTO registrations (registration_id, owner, created_at, host_fingerprint,"
            " architecture_digest, layer, units, n_bits, commitment, key_version, envelope,"
            " host_envelope, log_index, revoked_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                reg.registration_id,
                reg.owner,
                T0,
                reg.host_fingerprint,
                reg.architecture_digest,
                reg.layer,
                reg.units,
                reg.n_bits,
                reg.commitment,
                reg.key_version,
                reg.envelope,
                reg.host_envelope,
                0,
                None,
            ),
        )

    clock.now = T0 + 10
    store = open_store(db, clock=clock)
    try:
        assert store.tree_size() == 3
        assert store.find_by_fingerprint(reg.host_fingerprint) == [
            replace(reg, created_at=T0, log_index=0)
        ]
        assert register(store, make_registration("reg-new")).index == 3
        assert_log_consistent(store)
        # Rows written before version 7 carry no signature: they read back with none.
        assert {(e.key_id, e.signature) for e in store.entries(0, 4)} == {("", b"")}
    finally:
        store.close()
    with raw_sql(db) as execute:
        versions = execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [v for (v,) in versions] == list(range(1, LATEST_VERSION + 1))


def test_a_newer_schema_is_refused(db: str, clock: FakeClock) -> None:
    open_store(db, clock=clock).close()
    with raw_sql(db) as execute:
        execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (LATEST_VERSION + 1, "from the future", T0),
        )
    with pytest.raises(SchemaError, match="upgrade the server"):
        open_store(db, clock=clock)


def test_closed_store_refuses_calls(db: str) -> None:
    store = open_store(db)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.tree_size()


# --- concurrency and crashes ---------------------------------------------------------------


THREADS = 8
APPENDS_PER_THREAD = 25


def test_concurrent_appends_from_two_replicas_form_one_total_order(db: str) -> None:
    replicas = [open_store(db), open_store(db)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def writer(t: int) -> None:
        store = replicas[t % 2]
        try:
            barrier.wait()
            for n in range(APPENDS_PER_THREAD):
                reg = make_registration(f"t{t}-{n}", owner=f"owner-{t}")
                register(store, reg)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        total = THREADS * APPENDS_PER_THREAD
        for store in replicas:
            assert store.tree_size() == total
        entries = assert_log_consistent(replicas[1])
        assert len(entries) == total
        ids = {json.loads(e.entry)["registration_id"] for e in entries}
        assert ids == {f"t{t}-{n}" for t in range(THREADS) for n in range(APPENDS_PER_THREAD)}
    finally:
        for store in replicas:
            store.close()


# A writer process: appends registrations and reports each index on stdout as it commits.
_WRITER = """
import hashlib, json, sys
from freemark_keyserver.store import Registration, open_store

db, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(db)
for n in range(count):
    rid = f"{name}-{n}"
    fingerprint = hashlib.sha256(rid.encode()).digest()
    reg = Registration(rid, name, 0, fingerprint, b"a" * 32, "l", 8, 16, b"c" * 32, 1,
                       b"e" * 4096, b"h" * 4096, -1)
    build = lambda i, t: json.dumps(
        {"index": i, "kind": "register", "registration_id": rid, "time": t},
        sort_keys=True, separators=(",", ":")).encode()
    print(store.append("register", build, reg).index, flush=True)
store.close()
"""


def test_kill_9_mid_burst_never_splits_an_entry_from_its_registration(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'client'}{os.pathsep}{REPO / 'keyserver'}"}

    def spawn(name: str, count: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", _WRITER, db, name, str(count)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    open_store(db).close()  # migrate once up front, so both writers start appending at once
    victim = spawn("victim", 10_000)
    survivor = spawn("survivor", 60)
    try:
        assert victim.stdout is not None
        for _ in range(20):  # let the victim get well into its burst, racing the survivor
            assert victim.stdout.readline()
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0
        assert len(out.split()) == 60
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
                process.wait()

    store = open_store(db)
    try:
        entries = assert_log_consistent(store)
        names = [json.loads(e.entry)["registration_id"].split("-")[0] for e in entries]
        assert names.count("survivor") == 60
        assert names.count("victim") >= 20
        # The log goes on where the killed writer left it, with no gap.
        assert register(store, make_registration("after")).index == len(entries)
    finally:
        store.close()


def _member(member_id: str, family: bytes = b"\x05" * 32, fingerprint: bytes = b"\x06" * 32
            ) -> PanelMember:
    return PanelMember(member_id=member_id, family=family, fingerprint=fingerprint,
                       label=f"label of {member_id}", added_at=T0, key_version=1,
                       envelope=b"header-" + member_id.encode())


def test_panel_members_by_family_removal_duplicates_and_their_blobs(
    db: str, clock: FakeClock
) -> None:
    store = open_store(db, clock=clock)
    try:
        store.put_host_blob("pan-1", segments_of("pan-1", 2))
        store.add_panel_member(_member("pan-1"))
        store.add_panel_member(_member("pan-2", fingerprint=b"\x07" * 32))
        store.add_panel_member(_member("pan-3", family=b"\x08" * 32))
        with pytest.raises(DuplicateError):  # the same model twice in one family
            store.add_panel_member(_member("pan-4"))
        assert [m.member_id for m in store.panel_members(b"\x05" * 32)] == ["pan-1", "pan-2"]
        assert store.panel_members(b"\x05" * 32)[0] == _member("pan-1")
        assert len(store.panel_members()) == 3
        assert store.remove_panel_member("pan-1", T0 + 5)
        assert not store.remove_panel_member("pan-1", T0 + 6)  # already removed
        assert not store.remove_panel_member("pan-absent", T0 + 6)
        assert [m.member_id for m in store.panel_members(b"\x05" * 32)] == ["pan-2"]
        removed = [m for m in store.panel_members(active=False) if m.member_id == "pan-1"]
        assert removed[0].removed_at == T0 + 5
        store.add_panel_member(_member("pan-5"))  # the model may come back once removed
        store.update_panel_envelope("pan-2", 2, b"rewrapped")
        rewrapped = next(m for m in store.panel_members() if m.member_id == "pan-2")
        assert rewrapped.envelope == b"rewrapped"
        with pytest.raises(NotFoundError):
            store.update_panel_envelope("pan-absent", 2, b"x")
        clock.now = T0 + ORPHAN_GRACE_S * 1_000_000 + 1
        assert store.collect_orphan_host_blobs(clock.now) == 0  # a member's model is no orphan
        assert list(store.host_blob("pan-1")) == segments_of("pan-1", 2)
    finally:
        store.close()


def test_query_set_disclosures_are_kept_once_per_set_and_endpoint(store: Store) -> None:
    """Which endpoints saw which of an output key's sets (issue 19): one row per pair, kept
    per registration."""
    register(store, make_registration("reg-out"))
    assert store.disclosures("reg-out") == []
    store.add_disclosure("reg-out", 0, "http://10.0.0.1:8080", 1)
    store.add_disclosure("reg-out", 0, "http://10.0.0.1:8080", 2)  # the same pair: once
    store.add_disclosure("reg-out", 0, "http://10.0.0.2:8080", 3)
    store.add_disclosure("reg-out", 1, "http://10.0.0.1:8080", 4)
    assert store.disclosures("reg-out") == [(0, "http://10.0.0.1:8080"),
                                            (0, "http://10.0.0.2:8080"),
                                            (1, "http://10.0.0.1:8080")]
    assert store.disclosures("reg-other") == []
