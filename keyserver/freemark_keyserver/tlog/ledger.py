"""The server's view of its own log: `freemark.audit.registry.LogRegistry` kept up to date.

The server decides by the log, not by database columns alone (issue 11): whose a
registration is, whether it is revoked, and which earlier registrations a new upload is
checked against all come from the signed statements. The registry is built once from every
entry and then extended by the entries appended since (by this replica or another one on the
same database), each checked against its stored leaf hash. A column that disagrees with the
log changes no decision; the handlers report it and `freemark-keyserver audit` fails on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from freemark.audit.registry import LogRegistry
from freemark.tlog import merkle
from freemark_keyserver.store import Store

__all__ = ["DECIDING_COLUMNS", "Ledger"]

T = TypeVar("T")

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
    """A thread-safe, incrementally refreshed `LogRegistry` over one store."""

    def __init__(self) -> None:
        self._registry = LogRegistry()
        self._lock = threading.Lock()

    def read(self, store: Store, query: Callable[[LogRegistry], T]) -> T:
        """`query` on the registry, once it holds every entry `store` has now."""
        with self._lock:
            size = store.tree_size()
            if size < self._registry.size:  # restored from a backup under a running server
                raise merkle.LogProofError(
                    f"the store's log shrank from {self._registry.size} to {size} entries under "
                    "this server: stop it, and audit before serving again")
            if size > self._registry.size:
                for entry in store.entries(self._registry.size, size):
                    if entry.leaf_hash != merkle.leaf_hash(entry.entry):
                        raise merkle.LogProofError(
                            f"log entry {entry.index}: its stored leaf hash does not match it")
                    self._registry.add(entry.index, entry.entry)
            return query(self._registry)
