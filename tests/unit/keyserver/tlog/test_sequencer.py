"""The log's sequencer over a real SQLite store: one writer thread builds and signs each entry
at the index and time it reserves for it, outside the write (issue 21), while callers only
queue and wait, and the log stays one total order with times that never decrease, whoever
appends beside them. Two sequencers on one
database are two replicas: each one's reservations are wrong whenever the other appended
first, and are then built again inside the transaction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.crypto import SigningKey
from freemark_keyserver.store import LogEntry, Pending, Store, open_store
from freemark_keyserver.store.sqlite import SqliteStore
from freemark_keyserver.tlog.audit import audit
from freemark_keyserver.tlog.ledger import Ledger
from freemark_keyserver.tlog.sequencer import Sequencer
from signed_statements import verdict_body

SIGNER = SigningKey.generate()
THREADS = 8
APPENDS = 30  # per thread


_writing = threading.local()  # set while a thread is inside `append_batch`


class _Store(SqliteStore):
    """The real SQLite store, marking the calling thread while it runs a batch's
    transaction, and noting which threads ran one."""

    writers: set[int]

    def append_batch(self, *args: Any, **kwargs: Any) -> list[LogEntry | Exception]:
        self.writers = getattr(self, "writers", set()) | {threading.get_ident()}
        _writing.inside = True
        try:
            return super().append_batch(*args, **kwargs)
        finally:
            _writing.inside = False


class _Signer:
    """The server's entry signature, counting its calls made inside the write (the batch's
    transaction) and outside it."""

    def __init__(self) -> None:
        self.inside = self.outside = 0
        self._lock = threading.Lock()

    def __call__(self, body: bytes) -> tuple[str, bytes]:
        with self._lock:
            if getattr(_writing, "inside", False):
                self.inside += 1
            else:
                self.outside += 1
        return SIGNER.key_id, SIGNER.sign(body)


def _sequencer(store: Store, sign: _Signer) -> Sequencer:
    def note(size: int, root: bytes, last: int) -> bytes:
        head = merkle.TreeHead(origin="test", tree_size=size, root_hash=root,
                               timestamp=last // 1_000_000)
        return merkle.sign_checkpoint(SIGNER, head).note
    return Sequencer(store, Ledger(SIGNER.verifier()), sign, note)


def _verdict(index: int, now: int) -> bytes:
    return canonical_json(verdict_body(index, integrated_time=now))


def _refused(index: int, now: int) -> bytes:
    raise RuntimeError("this statement cannot be built")


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "freemark.sqlite3")
    open_store(path).close()
    yield path


def _burst(sequencers: list[Sequencer], callers: set[int] | None = None
           ) -> tuple[list[LogEntry], list[Exception]]:
    """THREADS callers per sequencer, APPENDS each (their thread ids noted in `callers`);
    every fifth of the first thread's statements cannot be built."""
    acknowledged: list[LogEntry] = []
    refused: list[Exception] = []
    lock = threading.Lock()

    def caller(sequencer: Sequencer, number: int) -> None:
        if callers is not None:
            with lock:
                callers.add(threading.get_ident())
        for k in range(APPENDS):
            failing = number == 0 and k % 5 == 0
            try:
                entry = sequencer.append(Pending("verify", _refused if failing else _verdict))
            except RuntimeError as exc:
                with lock:
                    refused.append(exc)
                continue
            with lock:
                acknowledged.append(entry)

    threads = [threading.Thread(target=caller, args=(s, n))
               for s in sequencers for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sequencer in sequencers:
        sequencer.close()
    return acknowledged, refused


def _check_log(store: Store, acknowledged: list[LogEntry]) -> list[LogEntry]:
    """Every acknowledged entry in the log as it was answered; indexes without gaps, times
    that never decrease, every entry signed and every checkpoint true."""
    audit(store, SIGNER.verifier())
    entries = store.entries(0, store.tree_size())
    assert sorted(e.index for e in acknowledged) == [e.index for e in entries]
    assert {e.index: e for e in entries} == {e.index: e for e in acknowledged}
    assert [e.created_at for e in entries] == sorted(e.created_at for e in entries)
    return entries


def test_entries_are_built_outside_the_write_and_a_failed_one_fails_alone(
        database: str) -> None:
    store, sign = _Store(database), _Signer()
    callers: set[int] = set()
    try:
        acknowledged, refused = _burst([_sequencer(store, sign)], callers)
        entries = _check_log(store, acknowledged)
        assert len(refused) == APPENDS // 5
        assert all(str(e) == "this statement cannot be built" for e in refused)
        assert len(entries) == THREADS * APPENDS - len(refused)
        # Signed outside the write, but for the entries of the first batch (the head not yet
        # known) and those batched behind a refused statement (its index went to the next
        # one: they are built again inside). A batch holds at most one entry per caller.
        assert sign.outside >= len(entries) - THREADS * (1 + len(refused))
        assert sign.inside <= THREADS * (1 + len(refused))
        # Every batch written by the one writer thread, never by a caller.
        assert len(store.writers) == 1 and not store.writers & callers
    finally:
        store.close()


def _writers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "freemark-log-writer"}


def test_closing_answers_the_queue_and_refuses_later_appends(database: str) -> None:
    store = _Store(database)
    before = _writers()
    sequencer = _sequencer(store, _Signer())
    try:
        answers: list[LogEntry] = []
        refused: list[RuntimeError] = []

        def caller() -> None:
            try:
                answers.append(sequencer.append(Pending("verify", _verdict)))
            except RuntimeError as exc:
                refused.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        sequencer.append(Pending("verify", _verdict))  # the writer has started
        assert _writers() - before
        sequencer.close()  # while the callers may still be queueing
        for thread in threads:
            thread.join()
        # Each caller got its committed entry or was refused before it queued: nothing is
        # left unanswered, and every answer is in the log.
        assert len(answers) + len(refused) == THREADS
        assert all("the log's sequencer is closed" in str(e) for e in refused)
        assert store.tree_size() == len(answers) + 1
        with pytest.raises(RuntimeError, match="the log's sequencer is closed"):
            sequencer.append(Pending("verify", _verdict))
        assert _writers() == before  # the writer has stopped
    finally:
        store.close()


def test_two_replicas_appending_at_once_keep_one_order(database: str) -> None:
    stores = [open_store(database), open_store(database)]
    sign = _Signer()
    try:
        acknowledged, refused = _burst([_sequencer(s, sign) for s in stores])
        entries = _check_log(stores[0], acknowledged)
        assert len(refused) == 2 * (APPENDS // 5)
        assert len(entries) == 2 * THREADS * APPENDS - len(refused)
    finally:
        for s in stores:
            s.close()
