"""The claim index: every registration's sealed signature, searchable per input group.

One exact inner-product index (faiss `IndexFlatIP`) per group (`signature.group_of`): a new
upload's tensors are compared with every earlier signature of each group its input kind
matches, and the nearest registrations (as many as the operator's `--claim-candidates`,
`ServerConfig.claim_candidates`) get the full check. Exact, not
approximate (HNSW and friends trade recall for speed): a brute-force scan of 100,000
signatures of 496 floats is a few milliseconds, and a missed neighbour here would be a stolen
model laundered, so no recall is traded away. faiss over usearch or hnswlib: its flat index is
exactly this scan, SIMD-vectorised, with nothing to tune and no graph to keep consistent.

A group's probes are made from the triggers of its anchor, its earliest indexed registration,
so every signature of a group is read on the same probes, which never leave the TTP. A
signature records the anchor it was read on; one read on another anchor (two first
registrations of a new group racing) is not comparable and is left out of the index, like a
signature that does not open: such a registration is *unindexed*, and every later Register of
its input kind checks it in full (fail closed).

The index is rebuilt from the store when a server starts and refreshed from it before every
use (rows of registrations logged since its last read), so replicas on one PostgreSQL database
share it through the database, not through each other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import faiss
import numpy as np

from freemark_keyserver.claims.signature import DIMENSIONS, group_digest, kind_of_group
from freemark_keyserver.crypto import CryptoError, Envelope, MasterKeyring, open_envelope, seal
from freemark_keyserver.store import ClaimSignature, Store

__all__ = ["ClaimIndex", "claim_record_id", "sealed_claim"]

log = logging.getLogger("freemark_keyserver")


def claim_record_id(registration_id: str) -> str:
    """The record id a claim signature is sealed under: its registration's, marked, so it
    can never be opened as (or swapped with) the registration's bundle."""
    return f"{registration_id}/claim"


def sealed_claim(keyring: MasterKeyring, registration_id: str, owner: str, group: bytes,
                 anchor: str, vector: np.ndarray) -> ClaimSignature:
    """A registration's claim signature, sealed like every model-derived secret."""
    payload = anchor.encode() + b"\n" + np.asarray(vector, dtype="<f4").tobytes()
    envelope = seal(keyring, payload, record_id=claim_record_id(registration_id), owner=owner)
    return ClaimSignature(registration_id, group, keyring.current_version, envelope.to_bytes())


@dataclass
class _Group:
    """One input group's signatures: the anchor they were read on, and the flat index."""

    anchor: str
    index: faiss.IndexFlatIP = field(default_factory=lambda: faiss.IndexFlatIP(DIMENSIONS))
    ids: list[str] = field(default_factory=list)


class ClaimIndex:
    """Every indexed registration's signature by group; thread-safe."""

    def __init__(self, keyring: MasterKeyring) -> None:
        self._keyring = keyring
        self._groups: dict[bytes, _Group] = {}
        self._indexed: set[str] = set()
        self._read_to = -1  # the log index of the last registration whose row was read
        self._lock = threading.Lock()

    def refresh(self, store: Store) -> None:
        """Add the signatures of registrations logged since the last read."""
        with self._lock:
            for row in store.claim_signatures(self._read_to):
                self._add(row)
                self._read_to = row.log_index

    def groups(self, kind: tuple[int, bool, bool]) -> list[tuple[bytes, str]]:
        """Every group of this input kind, with its anchor's registration id."""
        with self._lock:
            return [(g, group.anchor) for g, group in self._groups.items()
                    if kind_of_group(g) == kind]

    def anchor(self, group: bytes) -> str | None:
        """The registration whose triggers make this group's probes; None for a new group."""
        with self._lock:
            found = self._groups.get(group)
            return found.anchor if found is not None else None

    def indexed(self, registration_id: str) -> bool:
        """Whether the index can rank this registration (if not, it is always a candidate)."""
        with self._lock:
            return registration_id in self._indexed

    def nearest(self, group: bytes, vectors: Iterable[np.ndarray], k: int) -> list[str]:
        """The `k` registrations of `group` nearest to any of `vectors`, nearest first:
        always min(k, group size) of them, even with no vector (then the group's first), so
        how many full checks a Register runs never depends on what the upload computed on
        another owner's triggers (issue 18: its latency would tell)."""
        queries = [np.asarray(v, dtype=np.float32) for v in vectors]
        with self._lock:
            found = self._groups.get(group)
            if found is None or not found.ids:
                return []
            if not queries:
                return found.ids[:k]
            scores, rows = found.index.search(np.stack(queries), min(k, len(found.ids)))
            best: dict[str, float] = {}
            for score, row in zip(scores.ravel(), rows.ravel(), strict=True):
                if row >= 0:
                    rid = found.ids[row]
                    best[rid] = max(best.get(rid, -np.inf), float(score))
        return sorted(best, key=lambda rid: -best[rid])[:k]

    def memory_bytes(self) -> int:
        """The vectors the index holds, in bytes (faiss's flat storage: 4 per dimension)."""
        with self._lock:
            return sum(g.index.ntotal for g in self._groups.values()) * DIMENSIONS * 4

    def __len__(self) -> int:
        with self._lock:
            return len(self._indexed)

    def _add(self, row: ClaimSignature) -> None:
        """Index one row, or leave it out (logged) when it cannot be ranked with its group."""
        try:
            payload = open_envelope(self._keyring, Envelope.from_bytes(row.envelope),
                                    record_id=claim_record_id(row.registration_id),
                                    owner=row.owner)
            anchor, _, raw = payload.partition(b"\n")
            vector = np.frombuffer(raw, dtype="<f4")
            if vector.shape != (DIMENSIONS,):
                raise ValueError(f"a signature of {vector.shape} values")
            kind_of_group(row.group)
        except (CryptoError, ValueError, KeyError) as exc:
            log.error("ALERT: the claim signature of %s cannot be read (%s); it is checked in "
                      "full by every Register of its kind", row.registration_id,
                      type(exc).__name__)
            return
        group = self._groups.setdefault(row.group, _Group(anchor.decode()))
        if anchor.decode() != group.anchor:
            log.warning("the claim signature of %s was read on another anchor than its group "
                        "%s's; it is checked in full by every Register of its kind",
                        row.registration_id, group_digest(row.group))
            return
        group.index.add(vector.reshape(1, -1))
        group.ids.append(row.registration_id)
        self._indexed.add(row.registration_id)

