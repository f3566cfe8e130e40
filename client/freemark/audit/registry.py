"""Every registration's state, derived from the log alone: who registered what, and revoked.

The key server decides by it (which earlier registrations a new upload is checked against,
whether a registration is revoked, whose it is), its audit compares every database row with
it, and an offline checker derives a receipt's status from fetched entries with it: one
reading of the log for all three. The entries are RFC 8785 bodies of signed statements;
registration and revocation bodies are read with the field lists of
`freemark.records.types.Receipt` and `Revocation`, verdicts are skipped. The first revocation of a
registration counts; one that names an unknown registration, or the wrong log index for it,
is a fault (`LogProofError`), as is any entry that is not a statement naming its own index.

A checkpoint's root over the entries says the log holds them; only each entry's own
statement signature says the TTP made it (a database insider can write a row whose leaf hash
matches, and an unwary server would sign a checkpoint over it: issue 18). Every reader
therefore checks each entry with `verify_entry` before `add`: the key server's ledger and
audit, `freemark log monitor` and `receipt status`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from freemark.errors import CryptoError, InvalidReceiptError, LogProofError
from freemark.records.schema import from_json_fields
from freemark.records.types import (
    RECEIPT_KIND,
    REVOCATION_KIND,
    Receipt,
    Revocation,
    SignedStatement,
)
from freemark.tlog.signatures import KEY_ID_HEX_CHARS, Verifier

__all__ = ["LogRegistry", "RegistrationState", "RevocationState", "verify_entry"]


def verify_entry(index: int, entry: SignedStatement, verifier: Verifier) -> None:
    """Raise `LogProofError` unless log entry `index` carries the TTP's statement signature
    over its exact bytes: a row without one is one the TTP never signed (a forgery, or a row
    stored before statement signatures were), and no reader may take it for a fact."""
    if not entry.signature:
        raise LogProofError(f"log entry {index} carries no statement signature: the TTP never "
                            "signed it (a forged database row, or one from before signatures "
                            "were stored)")
    if entry.key_id != verifier.key_id:
        raise LogProofError(f"log entry {index} is signed by key "
                            f"{entry.key_id[:2 * KEY_ID_HEX_CHARS]!r}, not the TTP's "
                            f"{verifier.key_id!r}")
    try:
        verifier.verify(entry.signature, entry.body)
    except CryptoError:
        raise LogProofError(f"log entry {index}: its statement signature does not verify: the "
                            "row was forged or altered") from None


@dataclass(frozen=True)
class RevocationState:
    """A logged revocation's signed fields."""

    log_index: int
    integrated_time: int  # unix microseconds
    revoked_by: str
    reason: str


@dataclass(frozen=True)
class RegistrationState:
    """A logged registration's signed fields and, if revoked, its first revocation."""

    registration_id: str
    owner: str
    host_fingerprint: bytes
    architecture_digest: bytes
    layer: str
    n_bits: int
    watermark_commitment: bytes
    log_index: int
    integrated_time: int  # unix microseconds
    revocation: RevocationState | None = None

    @property
    def revoked_at(self) -> int | None:
        """When it was revoked (unix microseconds), None while active."""
        return None if self.revocation is None else self.revocation.integrated_time


def _fields(cls: type, body: dict[str, Any], index: int) -> dict[str, Any]:
    try:
        return from_json_fields(cls, body, f"log entry {index}")
    except InvalidReceiptError as exc:
        raise LogProofError(str(exc)) from None


class LogRegistry:
    """The registrations of a log, built entry by entry (`add`) in log order."""

    def __init__(self) -> None:
        self.size = 0
        self._by_id: dict[str, RegistrationState] = {}

    def add(self, index: int, entry: bytes) -> None:
        """Read entry `index`, the next one; registrations and revocations change the state."""
        if index != self.size:
            raise LogProofError(f"log entry {index} read out of order (expected {self.size})")
        try:
            body = json.loads(entry)
        except ValueError:  # UnicodeDecodeError is one too
            raise LogProofError(f"log entry {index} is not JSON") from None
        if not isinstance(body, dict) or body.get("log_index") != index:
            raise LogProofError(f"log entry {index} is not a statement naming its own index")
        kind = body.get("kind")
        if kind == RECEIPT_KIND:
            self._register(_fields(Receipt, body, index), index)
        elif kind == REVOCATION_KIND:
            self._revoke(_fields(Revocation, body, index), index)
        self.size += 1

    def extend(self, entries: Iterable[bytes], start: int) -> None:
        """`add` each of `entries`, the first at index `start`."""
        for offset, entry in enumerate(entries):
            self.add(start + offset, entry)

    def _register(self, fields: dict[str, Any], index: int) -> None:
        registration_id = fields["registration_id"]
        if registration_id in self._by_id:
            raise LogProofError(f"log entry {index} registers {registration_id} a second time")
        self._by_id[registration_id] = RegistrationState(
            registration_id=registration_id, owner=fields["owner"],
            host_fingerprint=fields["host_fingerprint"],
            architecture_digest=fields["architecture_digest"], layer=fields["layer"],
            n_bits=fields["n_bits"], watermark_commitment=fields["watermark_commitment"],
            log_index=index, integrated_time=fields["integrated_time"])

    def _revoke(self, fields: dict[str, Any], index: int) -> None:
        target = self._by_id.get(fields["registration_id"])
        if target is None or target.log_index != fields["registration_log_index"]:
            raise LogProofError(f"log entry {index} revokes {fields['registration_id']!r} at "
                                f"index {fields['registration_log_index']}, which the log does "
                                "not hold")
        if target.revocation is None:  # the first revocation counts
            revocation = RevocationState(index, fields["integrated_time"], fields["revoked_by"],
                                         fields["reason"])
            self._by_id[target.registration_id] = replace(target, revocation=revocation)

    def get(self, registration_id: str) -> RegistrationState | None:
        """The registration with this id, or None if the log has none."""
        return self._by_id.get(registration_id)

    def all(self) -> list[RegistrationState]:
        """Every registration, in log order (the order they were added in)."""
        return list(self._by_id.values())

    def by_fingerprint(self, fingerprint: bytes) -> list[RegistrationState]:
        """Registrations of these exact weights, revoked ones too, in log order."""
        return [r for r in self.all() if r.host_fingerprint == fingerprint]

    def by_architecture(self, digest: bytes) -> list[RegistrationState]:
        """Registrations of this architecture family, revoked ones too, in log order."""
        return [r for r in self.all() if r.architecture_digest == digest]
