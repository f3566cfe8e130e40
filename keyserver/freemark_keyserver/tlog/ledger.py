"""The server's view of its own log: `freemark.audit.registry.LogRegistry` kept up to date.

The server decides by the log, not by database columns alone (issue 11): whose a
registration is, whether it is revoked, and which earlier registrations a new upload is
checked against all come from the signed statements. The registry is built once from every
entry and then extended by the entries appended since (by this replica or another one on the
same database), each checked against its stored leaf hash and its stored statement signature
(`freemark.audit.registry.verify_entry`, with the server's own key): a database row the TTP
never signed is not a statement, whatever its leaf hash (issue 18). The batches this process
appends itself are folded in from memory (`integrate`): their bytes never came from a row, and
their signatures were made here a moment before. A column that disagrees
with the log changes no decision; the handlers report it and `freemark-keyserver audit` fails
on it.

A log that fails these checks fails closed: the ledger logs an ALERT for the operator and
answers INTERNAL to every read, and the server signs no checkpoint over it (`checked_root`),
until the operator repairs the database (run `freemark-keyserver audit`). The ledger reads
each entry once: it checks the entries appended since its last read, and keeps the Merkle
frontier of the leaves it computed from the entries themselves, so a checkpoint is signed
over exactly the entries it checked even if a stored leaf hash is rewritten afterwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from freemark.audit.registry import LogRegistry, verify_entry
from freemark.records.types import SignedStatement
from freemark.tlog import merkle
from freemark.tlog.signatures import Verifier
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.store import LogEntry, Store

__all__ = ["DECIDING_COLUMNS", "Ledger"]

T = TypeVar("T")
log = logging.getLogger("freemark_keyserver")

# Each registration column the server decides by, and the signed log field it must equal
# (`freemark.audit.registry.RegistrationState`): the handlers decide by the field, the audit fails
# on any row where the two differ.
DECIDING_COLUMNS = {
    "owner": "owner", "host_fingerprint": "host_fingerprint",
    "architecture_digest": "architecture_digest", "layer": "layer", "n_bits": "n_bits",
    "commitment": "watermark_commitment", "log_index": "log_index",
    "created_at": "integrated_time", "revoked_at": "revoked_at",
}


class Ledger:
    """A thread-safe, incrementally refreshed `LogRegistry` over one store, every entry of
    which carries a statement signature by `verifier`'s key (the server's own)."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier
        self._registry = LogRegistry()
        self._tree = merkle.Tree()  # of the leaves computed from the checked entries
        self._lock = threading.Lock()

    def read(self, store: Store, query: Callable[[LogRegistry], T]) -> T:
        """`query` on the registry, once it holds every entry `store` has now."""
        with self._lock:
            self._refresh(store)
            return query(self._registry)

    def checked_root(self, store: Store, size: int) -> bytes:
        """The Merkle root of the first `size` entries, once every one of them passed the
        ledger's checks: what the server may sign a checkpoint over, and nothing else.

        Computed from the leaves the ledger computed from the entries it checked, never from
        the stored leaf hashes, so a row rewritten after its check changes nothing signed.
        """
        with self._lock:
            self._refresh(store)
            self._check_size(size)
            return self._tree.hash(0, size)

    def inclusion_proof(self, store: Store, index: int, size: int) -> list[bytes]:
        """Entry `index`'s audit path in the tree of the first `size` checked entries, from
        the ledger's own tree: O(log² n) hashes looked up, no leaf read from the store."""
        with self._lock:
            if size > self._tree.size:  # the tree holds what was asked: nothing to read
                self._refresh(store)
            self._check_size(size)
            if not 0 <= index < size:
                raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
            return self._tree.path(index, 0, size)

    def root_with(self, store: Store, size: int, leaves: Sequence[bytes]) -> bytes:
        """The root the log will have once `leaves` follow its first `size` entries: what the
        sequencer signs a checkpoint over inside the transaction that appends them, while it
        holds the log's write lock (so `size` is every entry committed before them). The
        ledger's tree is left as it was: the leaves join it when read back, after commit."""
        with self._lock:
            if self._tree.size != size:  # entries another replica committed before this batch
                self._refresh(store)
            if self._tree.size != size:
                raise _alert(merkle.LogProofError(
                    f"the log holds {self._tree.size} checked entries where its head says {size}"))
            return self._tree.frontier(size).extended(leaves).root()

    def integrate(self, store: Store, size: int, entries: Sequence[LogEntry]) -> None:
        """Fold in a batch this process just built, signed and committed after the first
        `size` entries, without reading it back (or read the store, if the ledger is not at
        `size`).

        These entries never came from the database: their bytes are the ones this process
        signed a moment ago, and their leaf hashes the ones computed from those bytes when
        they were built (`Pending.build`: the same leaves the batch's checkpoint was signed
        over), so neither is computed again and their signatures are not verified again (an Ed25519 verification costs three signatures'
        time, and this runs on the log's write path). They must still carry the ledger's
        key id: a sequencer signing with another key than the one the ledger checks fails
        here, as its entries would on any later read."""
        with self._lock:
            if self._registry.size != size:
                self._refresh(store)
                return
            try:
                for entry in entries:
                    if entry.key_id != self._verifier.key_id or not entry.signature:
                        raise merkle.LogProofError(
                            f"log entry {entry.index} was signed by key {entry.key_id!r}, "
                            f"not the ledger's {self._verifier.key_id!r}")
                    self._add(entry, entry.leaf_hash)
            except merkle.LogProofError as exc:
                raise _alert(exc) from None

    def _check_size(self, size: int) -> None:
        """A checkpoint or proof is only ever asked of entries the ledger has checked."""
        if not 0 <= size <= self._tree.size:  # never: the log only grows under the lock
            raise _alert(merkle.LogProofError(f"a checkpoint of {size} entries was asked of "
                                              f"a log of {self._tree.size}"))

    def _refresh(self, store: Store) -> None:
        """Check and add the entries appended since the last read (under the lock)."""
        try:
            size = store.tree_size()
            if size < self._registry.size:  # restored from a backup under a running server
                raise merkle.LogProofError(
                    f"the store's log shrank from {self._registry.size} to {size} entries under "
                    "this server: stop it, and audit before serving again")
            if size > self._registry.size:
                for entry in store.entries(self._registry.size, size):
                    self._check_and_add(entry)
        except merkle.LogProofError as exc:
            raise _alert(exc) from None

    def _check_and_add(self, entry: LogEntry) -> None:
        """Check one entry (leaf hash, statement signature) and add it (under the lock)."""
        leaf = merkle.leaf_hash(entry.entry)
        if entry.leaf_hash != leaf:
            raise merkle.LogProofError(
                f"log entry {entry.index}: its stored leaf hash does not match it")
        verify_entry(entry.index, SignedStatement(entry.entry, entry.signature, entry.key_id),
                     self._verifier)
        self._add(entry, leaf)

    def _add(self, entry: LogEntry, leaf: bytes) -> None:
        """Add one checked entry whose leaf hash is `leaf` (under the lock)."""
        self._registry.add(entry.index, entry.entry)
        self._tree.extend([leaf])


def _alert(exc: merkle.LogProofError) -> ServiceError:
    """The operator's ALERT for a log that failed the ledger's checks, and the caller's
    fixed refusal: nothing is decided by, or signed over, an entry the TTP did not make."""
    log.error("ALERT: the log in the database failed the server's check: %s; refusing to "
              "decide by it or sign a checkpoint over it (run freemark-keyserver audit)", exc)
    return ServiceError(ErrorCode.INTERNAL, "the key server's log failed its integrity check; "
                        "the operator has been alerted")
