"""Re-check a whole log: every entry's statement signature (a row the TTP never signed is a
forgery, whatever its leaf hash), Merkle roots, checkpoint signatures and consistency, and that
the database holds exactly what the log justifies: every registration row's deciding columns
(owner, fingerprint, architecture, layer, bits, commitment, index, time, revoked or not)
equal its registration and revocation statements (`freemark.audit.registry`), and its whole host
blob is stored (every segment its header counts; their contents need the master key)."""

from __future__ import annotations

from freemark.audit.registry import LogRegistry, verify_entry
from freemark.records.types import SignedStatement
from freemark.tlog import merkle
from freemark.tlog.signatures import Verifier
from freemark_keyserver.crypto import CryptoError, StreamHeader, is_stream_header
from freemark_keyserver.store import Registration, Store, StoredCheckpoint
from freemark_keyserver.tlog.ledger import DECIDING_COLUMNS


def _stored_note(stored: StoredCheckpoint) -> bytes:
    """A stored checkpoint's note, once it is filed under the size it states."""
    try:
        checkpoint = merkle.parse_checkpoint(stored.note)
    except merkle.LogProofError as exc:
        raise merkle.LogProofError(f"stored checkpoint for size {stored.tree_size}: {exc}") from None
    if checkpoint.tree_size != stored.tree_size:
        raise merkle.LogProofError(f"stored checkpoint for size {stored.tree_size} states "
                                   f"size {checkpoint.tree_size}")
    return stored.note


def audit(store: Store, verifier: Verifier, origin: str | None = None) -> dict[str, int]:
    """Raise `merkle.LogProofError` at the first fault; return counts when the log is clean."""
    size = store.tree_size()
    entries = store.entries(0, size) if size else []
    for entry in entries:
        if entry.leaf_hash != merkle.leaf_hash(entry.entry):
            raise merkle.LogProofError(f"log entry {entry.index}: stored leaf hash does not match")
        verify_entry(entry.index, SignedStatement(entry.entry, entry.signature, entry.key_id),
                     verifier)
    checkpoints = [_stored_note(c) for c in store.checkpoints()]
    merkle.audit_entries([e.entry for e in entries], checkpoints, verifier, origin)
    registry = LogRegistry()
    registry.extend((e.entry for e in entries), 0)  # also: each entry names its own index
    registrations = _check_registrations(store, registry)
    return {"entries": size, "checkpoints": len(checkpoints), "registrations": registrations}


def _check_registrations(store: Store, registry: LogRegistry) -> int:
    """Every database row justified by the log, column for column, and every logged
    registration present in the database; return how many there are."""
    logged = {state.registration_id: state for state in registry.all()}
    seen = 0
    for record in store.registrations_for_rewrap():
        state = logged.get(record.registration_id)
        if state is None:
            raise merkle.LogProofError(
                f"registration {record.registration_id} is in the database but no log entry "
                "registers it")
        for column, name in DECIDING_COLUMNS.items():
            if getattr(record, column) != getattr(state, name):
                raise merkle.LogProofError(
                    f"registration {record.registration_id}: its {column} in the database is "
                    f"not what the log says (log entry {state.log_index}"
                    + ("" if state.revocation is None else
                       f", revocation at {state.revocation.log_index}") + ")")
        _check_host_blob(store, record)
        seen += 1
    if seen != len(logged):
        missing = sorted(set(logged) - {r.registration_id for r in store.registrations_for_rewrap()})
        raise merkle.LogProofError(f"registrations {', '.join(missing)} are in the log but not "
                                   "in the database")
    return seen


def _check_host_blob(store: Store, record: Registration) -> None:
    """Every segment the host's stream header counts is stored (pre-v3 hosts are inline)."""
    if not is_stream_header(record.host_envelope):
        return
    try:
        expected = StreamHeader.from_bytes(record.host_envelope).segments
    except CryptoError:
        raise merkle.LogProofError(
            f"registration {record.registration_id}: its host header is malformed") from None
    stored = store.host_blob_segments(record.registration_id)
    if stored != expected:
        raise merkle.LogProofError(f"registration {record.registration_id}: {stored} of its "
                                   f"{expected} host segments are stored")
