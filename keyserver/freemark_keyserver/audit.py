"""Re-check a whole log: Merkle roots, checkpoint signatures and consistency, statement
signatures, and that every stored registration agrees with its log entry and has its whole
host blob (every segment its header counts; their contents need the master key to check)."""

from __future__ import annotations

import json

from freemark import merkle
from freemark.records import RECEIPT_KIND
from freemark.signatures import Verifier
from freemark_keyserver.crypto import CryptoError, StreamHeader, is_stream_header
from freemark_keyserver.store import Registration, Store, StoredCheckpoint


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
    checkpoints = [_stored_note(c) for c in store.checkpoints()]
    merkle.audit_entries([e.entry for e in entries], checkpoints, verifier, origin)
    registrations = 0
    for entry in entries:
        body = json.loads(entry.entry)
        if int(body.get("log_index", -1)) != entry.index:
            raise merkle.LogProofError(f"log entry {entry.index} claims index {body.get('log_index')}")
        if body.get("kind") != RECEIPT_KIND:
            continue
        record = store.get_registration(body["registration_id"])
        if record is None or record.log_index != entry.index or record.owner != body["owner"] \
                or record.host_fingerprint.hex() != body["host_fingerprint"] \
                or record.commitment.hex() != body["watermark_commitment"]:
            raise merkle.LogProofError(
                f"registration {body['registration_id']} does not match log entry {entry.index}")
        _check_host_blob(store, record)
        registrations += 1
    return {"entries": size, "checkpoints": len(checkpoints), "registrations": registrations}


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
