"""A database-only insider forges log entries (issue 18, item 6), over a real key server.

The insider has write access to the server's SQLite file and nothing else: no signing key.
He appends a revocation of alice's registration to `log_entries`, exactly the bytes the server
would have written, with a true leaf hash, the log head bumped and the `revoked_at` column set
to match. Before statement signatures were stored beside the entries, the server decided by
that row (alice's Verify answered REVOKED), signed a checkpoint over it, and `audit`,
`log monitor` and `receipt status` all accepted it.

Now every reader checks each entry's statement signature against the TTP's key: the server
fails closed (INTERNAL for every decision, an operator ALERT, no checkpoint signed over the
row), `freemark-keyserver audit` fails naming the entry, and an outside monitor or
`receipt status` that is served the row raises an alarm instead of reporting a revocation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

import pytest
from test_keyserver_log import (  # the log tests' key server and fixtures, reused
    ORIGIN,
    Ttp,
    _audit,
    _monitor,
    bundle,
    files,
    ttp,
)

from freemark.audit.receipt import save_statement
from freemark.cli import main
from freemark.errors import ServerInternalError
from freemark.records import wire
from freemark.records.types import REVOCATION_KIND, Receipt, Revocation
from freemark.scheme.bundle import KeyBundle
from freemark.tlog import merkle
from freemark_keyserver.config import ServerConfig, load_signing_key
from ttp_fixtures import ModelFiles

__all__ = ["bundle", "files", "ttp"]  # fixtures, imported for pytest

# What the insider may put where the signature goes: nothing (a NULL column, as every row
# written before schema version 7 has), the genuine signature of another entry under the
# TTP's key id, or random bytes under the TTP's key id.
FORGERIES = ["unsigned", "copied-signature", "random-signature"]


def _database(ttp: Ttp) -> Path:
    return ttp.data_dir / "freemark.sqlite3"


def _forge_revocation(ttp: Ttp, receipt: Receipt, forgery: str) -> int:
    """The insider's revocation of `receipt`'s registration, straight into the SQLite file;
    return its log index."""
    with sqlite3.connect(_database(ttp)) as db:
        index, last = db.execute("SELECT COUNT(*), MAX(created_at) FROM log_entries").fetchone()
        body = wire.encode_body(Revocation, {
            "registration_id": receipt.registration_id,
            "registration_log_index": receipt.log_index, "revoked_by": receipt.owner,
            "reason": "key leaked", "log_index": index, "integrated_time": last + 1})
        key_id, signature = {
            "unsigned": (None, None),
            "copied-signature": db.execute(
                "SELECT key_id, signature FROM log_entries WHERE idx = 0").fetchone(),
            "random-signature": (receipt.statement.key_id, hashlib.sha512(body).digest()),
        }[forgery]
        db.execute("INSERT INTO log_entries (idx, kind, entry, leaf_hash, created_at, key_id,"
                   " signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (index, REVOCATION_KIND, body, merkle.leaf_hash(body), last + 1, key_id,
                    signature))
        db.execute("UPDATE log_head SET size = size + 1")
        db.execute("UPDATE registrations SET revoked_at = ? WHERE registration_id = ?",
                   (last + 1, receipt.registration_id))
    return index


def _status(ttp: Ttp, receipt_file: Path, pem: Path, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, str]:
    code = main(ttp.cli("receipt", "status", str(receipt_file), "--public-key", str(pem),
                        "--origin", ORIGIN, "--json"))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _alerts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "freemark_keyserver" and r.getMessage().startswith("ALERT")]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_revocation_row_is_never_acted_on_and_fails_every_check(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, tmp_path: Path, forgery: str,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="freemark_keyserver")
    pem, state, receipt_file = tmp_path / "ttp.pem", tmp_path / "monitor.json", tmp_path / "r.json"
    pem.write_bytes(load_signing_key(ServerConfig(data_dir=ttp.data_dir)).public_key_pem())
    with ttp.client("alice") as alice:
        receipt = alice.register(bundle, files.host)
    save_statement(receipt_file, receipt)
    assert _monitor(ttp, state, pem, capsys)[0] == 0
    assert _audit(ttp, capsys)[0] == 0
    remembered = state.read_bytes()

    forged = _forge_revocation(ttp, receipt, forgery)

    # The server decides nothing by the row: alice's Verify is not answered REVOKED, it fails
    # closed, and the operator is told which entry and why.
    with ttp.client("alice") as alice, pytest.raises(ServerInternalError) as refused:
        alice.verify(receipt.registration_id, files.finetuned)
    assert "operator has been alerted" in str(refused.value)
    assert any(f"log entry {forged}" in line for line in _alerts(caplog))
    # ... and signs no checkpoint over it.
    with ttp.client("judge") as judge, pytest.raises(ServerInternalError):
        judge.get_checkpoint()
    with sqlite3.connect(_database(ttp)) as db:
        assert db.execute("SELECT MAX(tree_size) FROM checkpoints").fetchone()[0] == forged

    code, err = _audit(ttp, capsys)
    assert code == 1 and f"log entry {forged}" in err
    # The server answers no checkpoint over the row, so an outside monitor gets none to
    # accept: it fails (2: the server's error) and keeps its state.
    code = main(ttp.cli("log", "monitor", "--state", str(state), "--public-key", str(pem),
                        "--origin", ORIGIN))
    assert code == 2 and "operator has been alerted" in capsys.readouterr().err
    assert state.read_bytes() == remembered
    code, out = _status(ttp, receipt_file, pem, capsys)
    assert code != 0 and "revoked" not in out


def test_a_checkpoint_signed_over_a_forged_row_before_the_fix_is_an_alarm(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The state the attack left on a server without this fix: the forged row under a
    checkpoint the TTP's own key signed. Monitors and `receipt status` are served the row
    under a valid checkpoint, so only its missing statement signature gives it away."""
    key = load_signing_key(ServerConfig(data_dir=ttp.data_dir))
    pem, state, receipt_file = tmp_path / "ttp.pem", tmp_path / "monitor.json", tmp_path / "r.json"
    pem.write_bytes(key.public_key_pem())
    with ttp.client("alice") as alice:
        receipt = alice.register(bundle, files.host)
    save_statement(receipt_file, receipt)
    assert _monitor(ttp, state, pem, capsys)[0] == 0
    code, out = _status(ttp, receipt_file, pem, capsys)
    assert code == 0 and json.loads(out)["status"] == "active"

    forged = _forge_revocation(ttp, receipt, "unsigned")
    with sqlite3.connect(_database(ttp)) as db:  # what the unfixed server signed and stored
        leaves = [bytes(h) for (h,) in db.execute("SELECT leaf_hash FROM log_entries ORDER BY idx")]
        last = db.execute("SELECT MAX(created_at) FROM log_entries").fetchone()[0]
        head = merkle.TreeHead(origin=ORIGIN, tree_size=len(leaves),
                               root_hash=merkle.root(leaves), timestamp=last // 1_000_000)
        db.execute("INSERT INTO checkpoints (tree_size, note) VALUES (?, ?)",
                   (len(leaves), merkle.sign_checkpoint(key, head).note))

    code, report, err = _monitor(ttp, state, pem, capsys)
    assert code == 1 and report["ok"] is False
    assert err.count("ALARM") == 1 and f"log entry {forged} carries no statement signature" in err
    code, out = _status(ttp, receipt_file, pem, capsys)
    assert code == 1 and "revoked" not in out
    assert f"log entry {forged} carries no statement signature" in out
    code, err = _audit(ttp, capsys)
    assert code == 1 and f"log entry {forged} carries no statement signature" in err
    with ttp.client("alice") as alice, pytest.raises(ServerInternalError):
        alice.verify(receipt.registration_id, files.finetuned)
