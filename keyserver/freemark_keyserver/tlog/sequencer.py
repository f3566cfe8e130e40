"""The log's append path as a transparency log runs it: sequence, integrate, publish.

Concurrent calls that each append a statement (Register, Verify, Revoke) are committed
together (group commit) by one writer thread. A caller only queues its entry and blocks once,
on a lock of its own; the writer takes every entry queued, up to `MAX_BATCH`, gives each the
next index and time (sequence: the head the last batch left), builds and signs it, and writes
the batch in one store transaction, which checks each reservation against the log head it
locked (an entry reserved for another index or an earlier time than its predecessor's,
because another replica appended or an entry before it failed, is built again there), folds
the leaves into the tree the ledger checked (integrate) and stores the checkpoint signed over
the result (publish). One commit, so one fsync, for the batch; then the writer releases the
batch's callers, each woken once, with its answer. One thread does a batch's work from start
to end: with each caller building its own entry and the callers taking turns as the writer,
16 appending threads spent more of the process's CPU handing the interpreter lock around than
writing (docs/operations.md, "Less Python per entry" and "One writer").

A batch's driver work (round trips, the checkpoint's note) costs the same for one entry as
for sixteen, so the writer waits for as many entries as the last batch answered plus those
queued behind it (the callers it expects back), but never more than `LINGER_S`: a caller
alone never waits, and under steady load the batches do not split into two halves that
alternate.

Nothing is acknowledged that is not durable: a caller gets its entry only after the
transaction that holds it has committed, so a kill -9 at any moment loses only entries no
caller was told about (`tests/integration/test_crash_safety.py`); a reservation is only
memory, and indexes come from the database's head. An entry that fails alone (its body
cannot be built, its registration is refused) fails only its own caller
(`Store.append_batch`).
"""

from __future__ import annotations

import _thread
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from freemark.records.types import Checkpoint
from freemark_keyserver.errors import ServiceError
from freemark_keyserver.store import EntrySigner, LogEntry, Pending, Store
from freemark_keyserver.tlog.ledger import Ledger

__all__ = ["LINGER_S", "MAX_BATCH", "Sequencer"]

# Entries per transaction at most: enough to amortise a commit under any load this server
# takes, few enough that one transaction (and the write lock it holds) stays short.
MAX_BATCH = 256

# The longest a batch waits for the callers the writer expects back: about one batch's
# write on this machine, so waiting costs a caller at most one more commit's time.
LINGER_S = 0.002

# Signs the tree head of (size, root, last integrated time in microseconds): the note stored.
NoteSigner = Callable[[int, bytes, int], bytes]


class _Slot:
    """One caller's entry, its answer once the batch that held it ended, and the lock its
    caller blocks on (held from the start; the writer releases it when the answer is in)."""

    __slots__ = ("answered", "pending", "result")

    def __init__(self, pending: Pending) -> None:
        self.pending = pending
        self.result: LogEntry | Exception | None = None
        self.answered = _thread.allocate_lock()
        self.answered.acquire()


class Sequencer:
    """Group commit of log entries into one store, each batch with its signed checkpoint."""

    def __init__(self, store: Store, ledger: Ledger, sign: EntrySigner, note: NoteSigner
                 ) -> None:
        self._store, self._ledger, self._sign, self._note = store, ledger, sign, note
        self._queue: list[_Slot] = []
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # the writer has entries to take
        self._expected = 1  # entries the writer waits for (up to LINGER_S) before a batch
        self._writer: threading.Thread | None = None
        self._closed = False
        # The index the next batch's first entry gets if the log is as this writer left it
        # (None: unknown until a batch commits), and the latest time given or committed.
        self._next: int | None = None
        self._last = 0
        # The latest checkpoint this process published, as a receipt carries it (its fields
        # known when it was signed: no caller parses the note again).
        self.published: Checkpoint | None = None
        self._pending_note: Checkpoint | None = None  # the writing batch's

    def append(self, pending: Pending) -> LogEntry:
        """Append one entry; return it once committed with a checkpoint that covers it.

        Raises what failed this entry alone, or what failed its whole batch."""
        slot = _Slot(pending)
        with self._lock:
            if self._closed:
                raise RuntimeError("the log's sequencer is closed: the server is stopping")
            self._queue.append(slot)
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="freemark-log-writer",
                                                daemon=True)
                self._writer.start()
            if len(self._queue) in (1, self._expected):  # the writer waits for one of these
                self._queued.notify()
        slot.answered.acquire()
        result = slot.result
        assert result is not None  # the writer answers every slot before releasing it
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        """Answer every entry queued, then stop the writer (the server is stopping)."""
        with self._lock:
            self._closed = True
            self._queued.notify()
            writer = self._writer
        if writer is not None:
            writer.join()

    def _run(self) -> None:
        """The writer: batch after batch until closed with nothing queued."""
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._build(batch)
                self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - every caller gets an answer
                for slot in batch:
                    if slot.result is None:
                        slot.result = RuntimeError(f"the log's writer failed before this "
                                                   f"entry's batch ended: {exc!r}")
            self._advance(batch)
            for slot in batch:
                slot.answered.release()

    def _take(self) -> list[_Slot]:
        """The next batch: every entry queued, up to `MAX_BATCH`, once as many as expected
        are queued or `LINGER_S` has passed since the first; empty once closed and drained."""
        with self._lock:
            while not self._queue:
                if self._closed:
                    return []
                self._queued.wait()
            deadline = time.monotonic() + LINGER_S
            while len(self._queue) < self._expected and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._queued.wait(left):
                    break
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        return batch

    def _build(self, batch: Sequence[_Slot]) -> None:
        """Give each entry the next index and time, and build and sign it before the
        transaction, where the log's head is known. A build that fails is left to the
        transaction, which builds it again and fails it alone."""
        if self._next is None:
            return  # the transaction builds every entry at the head it locks
        for offset, slot in enumerate(batch):
            at = self._last = max(self._store.now(), self._last)
            built = None
            with contextlib.suppress(Exception):
                built = slot.pending.build(self._next + offset, at, self._sign)
            slot.pending = replace(slot.pending, at=at, built=built)

    def _advance(self, batch: Sequence[_Slot]) -> None:
        """After a batch: the head it left (unknown where nothing committed), and how many
        entries to wait for next: the callers just answered and those queued meanwhile."""
        committed = [s.result for s in batch if isinstance(s.result, LogEntry)]
        if committed:
            self._next = committed[-1].index + 1
            self._last = max(self._last, committed[-1].created_at)
        else:
            self._next = None
        with self._lock:
            self._expected = min(MAX_BATCH, len(batch) + len(self._queue))

    def _write(self, batch: Sequence[_Slot]) -> None:
        """One transaction for the batch; every slot gets its entry or an exception."""
        self._pending_note = None
        try:
            results = self._store.append_batch([s.pending for s in batch], sign=self._sign,
                                               checkpoint=self._checkpoint)
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: each caller raises it
            results = [exc] * len(batch)
        else:
            committed = [r for r in results if isinstance(r, LogEntry)]
            if committed:  # integrate what this batch appended, without reading it back
                # An entry the ledger refuses (an ALERT) is durable all the same; every later
                # read of the ledger fails closed on it.
                with contextlib.suppress(ServiceError):
                    self._ledger.integrate(self._store, committed[0].index, committed)
                if self._pending_note is not None:
                    self.published = self._pending_note
        for slot, result in zip(batch, results, strict=True):
            slot.result = result

    def _checkpoint(self, size: int, entries: Sequence[LogEntry]) -> bytes:
        """The note over the log once `entries` follow its first `size` ones: the root
        from the ledger's checked tree and the entries' own bytes, never a stored hash (each
        leaf hash was computed from the bytes when the entry was built, `Pending.build`: this
        process's memory, not a row)."""
        root = self._ledger.root_with(self._store, size, [e.leaf_hash for e in entries])
        note = self._note(size + len(entries), root, entries[-1].created_at)
        self._pending_note = Checkpoint(note=note, tree_size=size + len(entries), root_hash=root)
        return note
