"""The log's append path as a transparency log runs it: sequence, integrate, publish.

Concurrent calls that each append a statement (Register, Verify, Revoke) are committed
together (group commit). Each caller first reserves the next index and time in memory
(sequence: the head the last batch left, plus the entries queued since) and builds and signs
its entry itself, outside the write: the statement's canonical bytes and its signature are
most of an entry's cost, and they are done while the previous batch waits on the database.
The first caller to find no write in progress then takes every built entry at the head of
the queue, up to `MAX_BATCH`, and writes them in one store transaction, which checks each
reservation against the log head it locked (an entry reserved for another index or an
earlier time than its predecessor's, because another replica appended or an entry before it
failed, is built again there), folds the leaves into the tree the ledger checked
(integrate) and stores the checkpoint signed over the result (publish). One commit, so one
fsync, for the batch; the callers that queued behind it wait and then find their answers.
The writer then wakes the batch's callers and, if entries are queued, the caller of the
first of them, who writes the next batch: one thread woken per answer and one per batch,
never every waiting caller at each commit (16 clients woken for each batch spent more time
handing the interpreter lock around than writing).

Nothing is acknowledged that is not durable: a caller gets its entry only after the
transaction that holds it has committed, so a kill -9 at any moment loses only entries no
caller was told about (`tests/integration/test_crash_safety.py`); a reservation is only
memory, and indexes come from the database's head. An entry that fails alone (its body
cannot be built, its registration is refused) fails only its own caller
(`Store.append_batch`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from freemark.records.types import Checkpoint
from freemark_keyserver.errors import ServiceError
from freemark_keyserver.store import EntrySigner, LogEntry, Pending, Store
from freemark_keyserver.tlog.ledger import Ledger

__all__ = ["MAX_BATCH", "Sequencer"]

# Entries per transaction at most: enough to amortise a commit under any load this server
# takes, few enough that one transaction (and the write lock it holds) stays short.
MAX_BATCH = 256

# Signs the tree head of (size, root, last integrated time in microseconds): the note stored.
NoteSigner = Callable[[int, bytes, int], bytes]


@dataclass
class _Slot:
    """One caller's entry: the index and time reserved for it (None: the log's head was not
    known, the transaction builds it), whether its caller has built it, its answer once the
    batch that held it ended, and the event its caller waits on (set when the answer is in,
    or when it is the next batch's writer)."""

    pending: Pending
    index: int | None = None
    at: int = 0
    epoch: int = 0  # the sequencer's epoch when it was reserved (`Sequencer._expect`)
    ready: bool = False
    result: LogEntry | Exception | None = None
    wake: threading.Event = field(default_factory=threading.Event)


class Sequencer:
    """Group commit of log entries into one store, each batch with its signed checkpoint."""

    def __init__(self, store: Store, ledger: Ledger, sign: EntrySigner, note: NoteSigner
                 ) -> None:
        self._store, self._ledger, self._sign, self._note = store, ledger, sign, note
        self._queue: list[_Slot] = []  # reserved, in index order; built ones are `ready`
        self._writing = False  # a caller is writing a batch, or has been woken to
        self._lock = threading.Lock()
        self._built = threading.Condition(self._lock)  # a caller finished building its entry
        # The index the next reservation gets, if every entry reserved before it commits
        # (None: unknown until a batch commits), and the latest time reserved or committed.
        self._next: int | None = None
        self._last = 0
        self._epoch = 0
        # The latest checkpoint this process published, as a receipt carries it (its fields
        # known when it was signed: no caller parses the note again).
        self.published: Checkpoint | None = None
        self._pending_note: Checkpoint | None = None  # the writing batch's

    def append(self, pending: Pending) -> LogEntry:
        """Append one entry; return it once committed with a checkpoint that covers it.

        Raises what failed this entry alone, or what failed its whole batch."""
        slot = self._reserve(pending)
        try:
            if slot.index is not None:
                # Built and signed here, outside the write: while one batch waits on the
                # database, the next one's callers build theirs. A build that fails is left
                # to the transaction, which builds it again and fails it alone.
                built = None
                with contextlib.suppress(Exception):
                    built = pending.build(slot.index, slot.at, self._sign)
                slot.pending = replace(pending, at=slot.at, built=built)
        finally:
            with self._lock:
                slot.ready = True
                leading, self._writing = not self._writing, True
                self._built.notify()
        if not leading:
            slot.wake.wait()  # its answer is in, or it writes the next batches
        if slot.result is None:
            self._write_until(slot)
        result = slot.result
        assert result is not None  # `_write_until` returns once it is in
        if isinstance(result, Exception):
            raise result
        return result

    def _reserve(self, pending: Pending) -> _Slot:
        """Queue `pending`, with the next index and time if the log's head is known."""
        slot = _Slot(pending)
        with self._lock:
            if self._next is not None:
                slot.index, self._next = self._next, self._next + 1
                slot.at = self._last = max(self._store.now(), self._last)
                slot.epoch = self._epoch
            self._queue.append(slot)
        return slot

    def _write_until(self, own: _Slot) -> None:
        """As the one writer, write batches until `own`'s is written (entries reserved
        before it may still be building when a batch is taken: then it waits for the next),
        waking each batch's callers; then hand the writer's turn to the caller of the first
        entry still queued (if any)."""
        try:
            while own.result is None:
                batch = self._take()
                try:
                    self._write(batch)
                finally:
                    for slot in batch:
                        if slot.result is None:  # `_write` was interrupted (KeyboardInterrupt)
                            slot.result = RuntimeError("the log's writer was interrupted "
                                                       "before this entry's batch ended")
                    with self._lock:
                        self._expect(batch)
                    for slot in batch:
                        slot.wake.set()
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                self._writing = successor is not None
            if successor is not None:
                successor.wake.set()

    def _take(self) -> list[_Slot]:
        """The next batch: the built entries at the head of the queue, up to `MAX_BATCH`,
        once the first is built. An entry built in an earlier epoch (`_expect`) is left for
        the transaction to build again, at its reserved time."""
        with self._lock:
            while not self._queue[0].ready:  # reserved before the writer's own, still building
                self._built.wait()
            count = next((n for n, s in enumerate(self._queue[:MAX_BATCH]) if not s.ready),
                         min(len(self._queue), MAX_BATCH))
            batch, self._queue = self._queue[:count], self._queue[count:]
            for slot in batch:
                if slot.epoch != self._epoch and slot.pending.built is not None:
                    slot.pending = replace(slot.pending, built=None)
        return batch

    def _expect(self, batch: Sequence[_Slot]) -> None:
        """After a batch (under the lock): the index the next reservation gets, the entries
        still queued following the batch's last one. Where the batch did not go as reserved
        (an entry failed or was built again: another replica appended, an entry before it
        failed), a new epoch starts and the entries queued are built again in the
        transaction; where no entry committed, the head is not known until one does."""
        committed = [s.result for s in batch if isinstance(s.result, LogEntry)]
        if any(isinstance(s.result, Exception)
               or (s.pending.built is not None and s.result is not s.pending.built)
               for s in batch):
            self._epoch += 1
        if not committed:
            self._next = None
            return
        self._next = committed[-1].index + 1 + len(self._queue)
        self._last = max(self._last, committed[-1].created_at)

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
