"""The server's ledger over a real SQLite store: it decides by, and signs checkpoints over,
only entries that carry its own statement signature (issue 18), and fails closed with an
operator ALERT on any other row; a leaf hash rewritten after it checked the entry changes no
checkpoint or proof it makes (they come from its own tree) and fails the next start."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from freemark.audit.registry import LogRegistry
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.crypto import SigningKey
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.store import Store, open_store
from freemark_keyserver.tlog.ledger import Ledger
from signed_statements import receipt_body, verdict_body

SIGNER = SigningKey.generate()


def _sign(body: bytes) -> tuple[str, bytes]:
    return SIGNER.key_id, SIGNER.sign(body)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "freemark.sqlite3"


@pytest.fixture
def store(database: Path) -> Iterator[Store]:
    s = open_store(str(database))
    s.append("register", lambda i, t: canonical_json(receipt_body(i)), sign=_sign)
    s.append("verify", lambda i, t: canonical_json(verdict_body(i, registration_id="reg-0000")),
             sign=_sign)
    yield s
    s.close()


def _size(registry: LogRegistry) -> int:
    return registry.size


def test_signed_entries_are_read_and_checkpointed(store: Store) -> None:
    ledger = Ledger(SIGNER.verifier())
    assert ledger.read(store, _size) == 2
    assert ledger.read(store, lambda r: r.get("reg-0000")) is not None
    assert ledger.checked_root(store, 2) == merkle.root(store.leaf_hashes(2))
    assert ledger.checked_root(store, 1) == merkle.root(store.leaf_hashes(1))


def test_a_row_without_the_servers_signature_fails_closed(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(SIGNER.verifier())
    assert ledger.read(store, _size) == 2
    store.append("verify", lambda i, t: canonical_json(verdict_body(i)))  # no signature
    for call in (lambda: ledger.read(store, _size), lambda: ledger.checked_root(store, 3)):
        with pytest.raises(ServiceError) as refused:
            call()
        assert refused.value.code is ErrorCode.INTERNAL
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["ALERT", "ALERT"]
    assert "log entry 2 carries no statement signature" in caplog.records[0].getMessage()
    # While the row is there, nothing is checkpointed, not even the tree before it.
    with pytest.raises(ServiceError):
        ledger.checked_root(store, 2)
    # Entries signed by another key are refused as surely as unsigned ones.
    with pytest.raises(ServiceError):
        Ledger(SigningKey.generate().verifier()).read(store, _size)
    assert "log entry 0 is signed by key" in caplog.records[-1].getMessage()


def test_a_leaf_hash_rewritten_after_the_check_gets_no_checkpoint(
        store: Store, database: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(SIGNER.verifier())
    checked = [ledger.checked_root(store, size) for size in (1, 2)]
    proof = ledger.inclusion_proof(store, 0, 2)
    with sqlite3.connect(database) as db:  # an insider under the running server
        db.execute("UPDATE log_entries SET leaf_hash = zeroblob(32) WHERE idx = 0")
    # Every size, and every proof, comes from the leaves of the entries it checked.
    assert [ledger.checked_root(store, size) for size in (1, 2)] == checked
    assert ledger.inclusion_proof(store, 0, 2) == proof
    merkle.verify_inclusion(merkle.leaf_hash(store.entries(0, 1)[0].entry), 0, 2, proof,
                            checked[1])
    with pytest.raises(ServiceError):  # and a fresh ledger (a restart) refuses the row
        Ledger(SIGNER.verifier()).read(store, _size)
    assert "log entry 0: its stored leaf hash does not match" in caplog.records[-1].getMessage()
