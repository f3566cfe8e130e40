"""The log seen from outside, over a real key server on loopback (issue 11).

Revocation is a signed log statement that verifies offline; the server decides by the log,
so an insider's edit of a revoked flag or an architecture digest in the database changes no
decision and fails `freemark-keyserver audit`.

`freemark log entries` lets anyone recompute the signed tree; `freemark log monitor` follows
the checkpoints and raises an alarm when the server restored its database from a backup (the
tree shrank, then the same size came back with another root), or started signing as another
log; a receipt whose checkpoint is older than the receipt itself is refused offline.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from freemark.audit.receipt import save_statement
from freemark.cli import main
from freemark.derive import derive_key
from freemark.errors import AlreadyRegisteredError, RevokedError
from freemark.formats.pt2 import load_program
from freemark.records.types import Checkpoint
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import load_triggers
from freemark.tlog import merkle
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.cli import main as keyserver_main
from freemark_keyserver.config import ServerConfig, load_signing_key
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models

ORIGIN = "ttp.test/log"


@dataclass
class Ttp:
    """A key server on a data dir that survives restarts, with alice (owner) and a judge."""

    data_dir: Path
    tokens: dict[str, str]
    running: RunningServer | None = None

    def start(self, origin: str = ORIGIN) -> Ttp:
        config = ServerConfig(data_dir=self.data_dir, listen="127.0.0.1:0", grace_seconds=1,
                              origin=origin)
        self.running = create_server(config)
        return self

    def stop(self) -> None:
        assert self.running is not None
        self.running.stop(grace=1)
        self.running = None

    @property
    def address(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(self.address, token=self.tokens[who], tls=False)

    def cli(self, *args: str) -> list[str]:
        """Connection flags for a `freemark` command run as the judge."""
        return [*args, "--server", self.address, "--token", self.tokens["judge"], "--insecure"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_models(tmp_path_factory.mktemp("log-models"))


@pytest.fixture(scope="module")
def bundle(files: ModelFiles) -> KeyBundle:
    return derive_key(load_program(files.host), layer="act", owner="alice",
                      triggers=load_triggers(files.triggers))


@pytest.fixture
def ttp(tmp_path: Path) -> Iterator[Ttp]:
    server = Ttp(tmp_path / "ttp", {"alice": new_token(), "judge": new_token()}).start()
    assert server.running is not None
    for name, role in (("alice", "owner"), ("judge", "arbiter")):
        server.running.ctx.store.add_principal(
            Principal(name, role, hash_token(server.tokens[name]), 0))
    yield server
    if server.running is not None:
        server.stop()


def _monitor(ttp: Ttp, state: Path, pem: Path, capsys: pytest.CaptureFixture[str]
             ) -> tuple[int, dict[str, object], str]:
    code = main(ttp.cli("log", "monitor", "--state", str(state), "--public-key", str(pem),
                        "--origin", ORIGIN, "--json"))
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_the_monitor_follows_the_log_and_catches_a_restored_backup_fork(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pem, state = tmp_path / "ttp.pem", tmp_path / "monitor.json"
    pem.write_bytes(load_signing_key(ServerConfig(data_dir=ttp.data_dir)).public_key_pem())
    with ttp.client("alice") as alice:
        receipt = alice.register(bundle, files.host)
    code, report, _ = _monitor(ttp, state, pem, capsys)
    assert code == 0 and report["new_size"] == 1 and report["old_size"] is None
    assert report["entries_checked"] is True and report["entries_verified"] == 1

    with ttp.client("judge") as judge:
        judge.verify(receipt.registration_id, files.finetuned)
    code, report, _ = _monitor(ttp, state, pem, capsys)
    assert (code, report["old_size"], report["new_size"], report["entries_verified"]) == \
        (0, 1, 2, 1)

    # Anyone can recompute the signed root from the served entries.
    assert main(ttp.cli("log", "entries", "--start", "0", "--end", "2", "--json")) == 0
    served = json.loads(capsys.readouterr().out)["entries"]
    leaves = [merkle.leaf_hash(base64.b64decode(e["body_b64"])) for e in served]
    with ttp.client("judge") as judge:
        assert merkle.root(leaves) == judge.get_checkpoint().root_hash
    assert [e["body"]["kind"] for e in served] == ["freemark/v1/registration",
                                                   "freemark/v1/coarse-verdict"]

    # The operator backs up the database at size 2; the log grows to 3, the monitor sees it.
    ttp.stop()
    database = ttp.data_dir / "freemark.sqlite3"
    shutil.copy(database, tmp_path / "backup.sqlite3")
    ttp.start()
    with ttp.client("judge") as judge:
        judge.verify(receipt.registration_id, files.independent)
    code, report, _ = _monitor(ttp, state, pem, capsys)
    assert (code, report["new_size"]) == (0, 3)
    remembered = state.read_bytes()

    # Restore the backup: the signed tree shrinks back to 2 entries.
    ttp.stop()
    shutil.copy(tmp_path / "backup.sqlite3", database)
    ttp.start()
    code, report, err = _monitor(ttp, state, pem, capsys)
    assert code == 1 and report["ok"] is False
    assert "ALARM" in err and "the log shrank" in err
    assert state.read_bytes() == remembered  # a fault never replaces the state

    # New entries on the restored copy: the same size 3 now has another root.
    with ttp.client("judge") as judge:
        judge.verify(receipt.registration_id, files.finetuned)
    code, report, err = _monitor(ttp, state, pem, capsys)
    assert code == 1 and "FORK: the log signed two different trees of 3 entries" in err
    assert state.read_bytes() == remembered

    # One entry more, and the fork shows as a failed consistency proof instead.
    with ttp.client("judge") as judge:
        judge.verify(receipt.registration_id, files.independent)
    code, report, err = _monitor(ttp, state, pem, capsys)
    assert code == 1 and "FORK: the tree of 4 entries does not extend the one of 3" in err

    # A server that starts signing as another log is refused too, whatever it extends.
    ttp.stop()
    ttp.start(origin="elsewhere.test/log")
    with ttp.client("judge") as judge:
        judge.verify(receipt.registration_id, files.finetuned)
    fresh = tmp_path / "fresh.json"
    code, report, err = _monitor(ttp, fresh, pem, capsys)
    assert code == 1 and "of log 'elsewhere.test/log', not of 'ttp.test/log'" in err
    assert not fresh.exists()


def test_a_receipt_later_than_its_checkpoint_is_refused(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    key = load_signing_key(ServerConfig(data_dir=ttp.data_dir))
    pem = tmp_path / "ttp.pem"
    pem.write_bytes(key.public_key_pem())
    with ttp.client("alice") as alice:
        receipt = alice.register(bundle, files.host)
    genuine = tmp_path / "receipt.json"
    save_statement(genuine, receipt)
    assert main(["receipt", "verify", str(genuine), "--public-key", str(pem),
                 "--origin", ORIGIN]) == 0
    assert main(["receipt", "verify", str(genuine), "--public-key", str(pem),
                 "--origin", "another.test/log"]) == 1
    assert "not of the expected 'another.test/log'" in capsys.readouterr().err

    # The TTP's own key signs the same tree head dated ten years before the receipt.
    head = merkle.parse_checkpoint(receipt.inclusion.checkpoint.note)
    backdated = replace(head, timestamp=head.timestamp - 10 * 365 * 86400)
    note = merkle.sign_checkpoint(key, backdated).note
    forged = replace(receipt, inclusion=replace(
        receipt.inclusion, checkpoint=Checkpoint(note, head.tree_size, head.root_hash)))
    save_statement(tmp_path / "backdated.json", forged)
    assert main(["receipt", "verify", str(tmp_path / "backdated.json"), "--public-key",
                 str(pem), "--origin", ORIGIN]) == 1
    assert "after its checkpoint's" in capsys.readouterr().err


# --- revocation: a signed log statement, and the log decides ----------------------------------


def _as(ttp: Ttp, who: str, *args: str) -> list[str]:
    return [*args, "--server", ttp.address, "--token", ttp.tokens[who], "--insecure"]


def _add_owner(ttp: Ttp, name: str) -> None:
    assert ttp.running is not None
    ttp.tokens[name] = new_token()
    ttp.running.ctx.store.add_principal(Principal(name, "owner", hash_token(ttp.tokens[name]), 0))


def _audit(ttp: Ttp, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = keyserver_main(["audit", "--data-dir", str(ttp.data_dir), "--origin", ORIGIN])
    return code, capsys.readouterr().err


def _edit_database(ttp: Ttp, sql: str) -> None:
    """An insider's edit, straight into the server's SQLite file."""
    with sqlite3.connect(ttp.data_dir / "freemark.sqlite3") as db:
        assert db.execute(sql).rowcount == 1


def test_a_revocation_is_logged_verifies_offline_and_only_the_log_decides(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "ttp.pem"
    pem.write_bytes(load_signing_key(ServerConfig(data_dir=ttp.data_dir)).public_key_pem())
    with ttp.client("alice") as alice:
        receipt = alice.register(bundle, files.host)
    save_statement(tmp_path / "receipt.json", receipt)
    rid = receipt.registration_id

    assert main(_as(ttp, "alice", "revoke", rid, "--reason", "key leaked", "--json")) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["revoked_at"] is not None and info["revocation"]["reason"] == "key leaked"
    (tmp_path / "revocation.json").write_text(json.dumps(info["revocation"]))
    assert main(["receipt", "verify", str(tmp_path / "revocation.json"), "--public-key", str(pem),
                 "--origin", ORIGIN, "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert (verified["kind"], verified["registration_id"], verified["revoked_by"],
            verified["registration_log_index"]) == ("revocation", rid, "alice", 0)
    assert main(_as(ttp, "alice", "revoke", rid, "--json")) == 0  # twice: nothing more logged
    capsys.readouterr()
    assert main(ttp.cli("log", "entries", "--start", "0", "--end", "10", "--json")) == 0
    kinds = [e["body"]["kind"] for e in json.loads(capsys.readouterr().out)["entries"]]
    assert kinds == ["freemark/v1/registration", "freemark/v1/revocation"]

    def status() -> dict[str, object]:
        assert main(ttp.cli("receipt", "status", str(tmp_path / "receipt.json"), "--public-key",
                            str(pem), "--origin", ORIGIN, "--json")) == 0
        return dict(json.loads(capsys.readouterr().out))

    assert status()["status"] == "revoked" and status()["reason"] == "key leaked"

    # Revoking does not make the model anyone's to claim: bob's key on the same host is refused.
    _add_owner(ttp, "bob")
    bobs = derive_key(load_program(files.host), layer="act", owner="bob",
                      triggers=load_triggers(files.triggers))
    with ttp.client("bob") as bob, pytest.raises(AlreadyRegisteredError):
        bob.register(bobs, files.host)

    # An insider un-revokes it in the database: nothing the server decides changes, audit fails.
    assert _audit(ttp, capsys)[0] == 0
    _edit_database(ttp, f"UPDATE registrations SET revoked_at = NULL WHERE registration_id = '{rid}'")
    with ttp.client("judge") as judge, pytest.raises(RevokedError):
        judge.verify(rid, files.finetuned)
    with ttp.client("judge") as judge:
        assert judge.get_registration(rid).revoked_at == info["revoked_at"]
    assert status()["status"] == "revoked"
    code, err = _audit(ttp, capsys)
    assert code == 1 and f"registration {rid}: its revoked_at in the database" in err


def test_an_edited_architecture_digest_fails_the_audit_and_keeps_the_prior_claim_check(
        ttp: Ttp, files: ModelFiles, bundle: KeyBundle, capsys: pytest.CaptureFixture[str]
        ) -> None:
    with ttp.client("alice") as alice:
        rid = alice.register(bundle, files.host).registration_id
    _edit_database(ttp, "UPDATE registrations SET architecture_digest = zeroblob(32)"
                        f" WHERE registration_id = '{rid}'")
    code, err = _audit(ttp, capsys)
    assert code == 1 and f"registration {rid}: its architecture_digest in the database" in err
    # Mallory registers his fine-tune of alice's model under his own key: still refused.
    _add_owner(ttp, "mallory")
    stolen = derive_key(load_program(files.finetuned), layer="act", owner="mallory",
                        triggers=load_triggers(files.triggers))
    with ttp.client("mallory") as mallory, pytest.raises(AlreadyRegisteredError):
        mallory.register(stolen, files.finetuned)
