"""The log's append path as a transparency log runs it: sequence, integrate, publish.

Concurrent calls that each append a statement (Register, Verify, Revoke) are committed
together (group commit): the first caller to find no write in progress takes every entry
queued so far, up to `MAX_BATCH`, and writes them in one store transaction, which assigns
their indexes (sequence), folds their leaves into the tree the ledger checked
(integrate) and stores the checkpoint signed over the result (publish). One commit, so one
fsync, for the batch; the callers that queued behind it wait and then find their answers.
The writer then wakes the batch's callers and, if entries are queued, the caller of the
first of them, who writes the next batch: one thread woken per answer and one per batch,
never every waiting caller at each commit (16 clients woken for each batch spent more time
handing the interpreter lock around than writing).

Nothing is acknowledged that is not durable: a caller gets its entry only after the
transaction that holds it has committed, so a kill -9 at any moment loses only entries no
caller was told about (`tests/integration/test_crash_safety.py`). An entry that fails alone
(its body cannot be built, its registration is refused) fails only its own caller
(`Store.append_batch`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from freemark.tlog import merkle
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
    """One caller's entry, its answer once the batch that held it ended, and the event its
    caller waits on (set when the answer is in, or when it is the next batch's writer)."""

    pending: Pending
    result: LogEntry | Exception | None = None
    wake: threading.Event = field(default_factory=threading.Event)


class Sequencer:
    """Group commit of log entries into one store, each batch with its signed checkpoint."""

    def __init__(self, store: Store, ledger: Ledger, sign: EntrySigner, note: NoteSigner
                 ) -> None:
        self._store, self._ledger, self._sign, self._note = store, ledger, sign, note
        self._queue: list[_Slot] = []
        self._writing = False  # a caller is writing a batch, or has been woken to
        self._lock = threading.Lock()
        # The latest checkpoint this process published: (tree size, signed note).
        self.published: tuple[int, bytes] | None = None
        self._pending_note: tuple[int, bytes] | None = None  # the writing batch's

    def append(self, pending: Pending) -> LogEntry:
        """Append one entry; return it once committed with a checkpoint that covers it.

        Raises what failed this entry alone, or what failed its whole batch."""
        slot = _Slot(pending)
        with self._lock:
            self._queue.append(slot)
            leading, self._writing = not self._writing, True
        if not leading:
            slot.wake.wait()  # its answer is in, or it writes the next batch
        while slot.result is None:
            self._lead()
        if isinstance(slot.result, Exception):
            raise slot.result
        return slot.result

    def _lead(self) -> None:
        """Write the next batch as the one writer, then wake its callers and hand the
        writer's turn to the caller of the first entry still queued (if any)."""
        with self._lock:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        try:
            self._write(batch)
        finally:
            for slot in batch:
                if slot.result is None:  # `_write` was interrupted (KeyboardInterrupt)
                    slot.result = RuntimeError("the log's writer was interrupted before this "
                                               "entry's batch ended")
            with self._lock:
                successor = self._queue[0] if self._queue else None
                self._writing = successor is not None
            for slot in batch:
                slot.wake.set()
            if successor is not None:
                successor.wake.set()

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
        from the ledger's checked tree and the entries' own bytes, never a stored hash."""
        root = self._ledger.root_with(self._store, size,
                                      [merkle.leaf_hash(e.entry) for e in entries])
        note = self._note(size + len(entries), root, entries[-1].created_at)
        self._pending_note = (size + len(entries), note)
        return note
