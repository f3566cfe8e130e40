"""Registrations derived from the log alone: revocations, refused entries, lookups."""

from __future__ import annotations

from dataclasses import replace

import pytest

from freemark.audit.registry import LogRegistry, verify_entry
from freemark.errors import LogProofError
from freemark.records.types import REVOCATION_KIND
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.crypto import SigningKey
from signed_statements import receipt_body, standard_log, verdict_body


def _revocation(index: int, target: str, target_index: int, reason: str = "key leaked"
                ) -> bytes:
    return canonical_json({"kind": REVOCATION_KIND, "registration_id": target,
                           "registration_log_index": target_index, "revoked_by": "alice",
                           "reason": reason, "log_index": index,
                           "integrated_time": 1_700_000_000_000_000 + index})


def _log(*entries: bytes) -> LogRegistry:
    registry = LogRegistry()
    registry.extend(entries, 0)
    return registry


def test_the_first_revocation_counts_and_verdicts_change_nothing() -> None:
    registry = _log(canonical_json(receipt_body(0)), canonical_json(verdict_body(1)),
                    _revocation(2, "reg-0000", 0), _revocation(3, "reg-0000", 0, "again"))
    state = registry.get("reg-0000")
    assert state is not None and state.revocation is not None
    assert (state.revocation.log_index, state.revocation.reason) == (2, "key leaked")
    assert state.revoked_at == 1_700_000_000_000_002
    assert registry.by_fingerprint(bytes(range(32))) == [state]
    assert registry.by_architecture(bytes(range(96, 128))) == [state]
    assert registry.size == 4


BAD = {
    "revokes an unknown registration": (_revocation(1, "reg-9999", 0),),
    "revokes at the wrong index": (_revocation(1, "reg-0000", 5),),
    "registers twice": (canonical_json(receipt_body(1, registration_id="reg-0000")),),
    "names another index": (canonical_json(receipt_body(7)),),
    "lacks a signed field": (canonical_json({k: v for k, v in receipt_body(1).items()
                                             if k != "architecture_digest"}),),
    "not JSON": (b"\xff",),
}


@pytest.mark.parametrize("entries", BAD.values(), ids=BAD.keys())
def test_entries_the_log_cannot_justify_are_refused(entries: tuple[bytes, ...]) -> None:
    with pytest.raises(LogProofError):
        _log(canonical_json(receipt_body(0)), *entries)


def test_an_entry_is_a_fact_only_with_the_ttps_statement_signature() -> None:
    """A row whose bytes and leaf hash are right is still refused without the TTP's signature
    over exactly those bytes (issue 18): none, another key's, another entry's, or a body
    altered under a genuine signature."""
    log = standard_log()
    verifier = log.signer.verifier()
    for index in range(len(log.entries)):
        verify_entry(index, log.statement(index), verifier)
    genuine = log.statement(1)
    other = SigningKey.generate()
    cases = {
        "carries no statement signature": replace(genuine, signature=b"", key_id=""),
        f"is signed by key {other.key_id!r}": replace(
            genuine, signature=other.sign(genuine.body), key_id=other.key_id),
        "signature does not verify": replace(genuine, signature=log.signatures[2]),
        "signature does not verify: the row": replace(
            genuine, body=_revocation(1, "reg-0000", 0)),
    }
    for reason, entry in cases.items():
        with pytest.raises(LogProofError, match=f"log entry 1 .*{reason}|log entry 1: .*{reason}"):
            verify_entry(1, entry, verifier)
