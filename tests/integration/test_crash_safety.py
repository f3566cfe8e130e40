"""kill -9 a key server in the middle of a burst of registrations, on SQLite and on PostgreSQL
(scale-out issue).

A real `freemark-keyserver serve` process with the real sandbox takes a burst of registrations,
started a moment apart, and is killed with SIGKILL as soon as the first receipt reaches its
client, with its sandbox workers, as a service manager stopping the unit's control group
would. After a restart on the same database:

- every registration whose receipt reached a client is there, its receipt verifies offline
  with the TTP's public key, and its host still decrypts (a .safetensors verify reads it back);
- nothing is half-written: each registration has exactly its log entry and every host segment
  its header counts, each registration entry has its registration, and the audit passes;
- asking again for a registration whose receipt was lost gives the answer the database
  implies: ALREADY_EXISTS naming it if it committed before the kill, a receipt if not.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freemark.audit.receipt import verify_receipt
from freemark.errors import AlreadyRegisteredError, FreemarkError
from freemark.records.types import RECEIPT_KIND, VERDICT_KIND, Receipt
from freemark.rpc import KeyServiceClient
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.crypto import MasterKeyring, Verifier, load_or_create_signing_key
from freemark_keyserver.handlers.context import Context, append_entry, inclusion_proof
from freemark_keyserver.store import open_store
from freemark_keyserver.tlog.audit import audit
from signed_statements import verdict_body
from ttp_fixtures import ServerProcess, cli_env, json_out, run_cli
from ttp_fleet import ARBITER, Host, add_principals, fleet_principals, shared_keys

BURST = 5
STAGGER_S = 0.75  # between registrations, so the kill finds them at different stages
FIRST_RECEIPT_S = 120.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its sandbox workers, which run in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def kill_9(process: ServerProcess) -> None:
    """SIGKILL the server and the workers it started, by their process ids."""
    assert process.process is not None
    workers = descendants(process.process.pid)
    process.process.send_signal(signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.process.communicate(timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_mid_burst_keeps_every_acknowledged_registration(
    backend: str, hosts: list[Host], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = str(tmp_path / "ttp.sqlite3") if backend == "sqlite" else request.getfixturevalue("pg_db")
    keys = shared_keys(tmp_path / "keys")
    tokens = add_principals(db, fleet_principals(hosts))
    server_args = ["--db", db, *keys.cli_args()]
    server = ServerProcess(tmp_path / "ttp", *server_args).start()
    acknowledged: dict[int, Receipt] = {}
    first = threading.Event()

    def register(index: int) -> None:
        time.sleep(index * STAGGER_S)
        host = hosts[index]
        try:
            with KeyServiceClient(server.address, token=tokens[host.owner], retries=0,
                                  timeout=FIRST_RECEIPT_S) as ttp:
                acknowledged[index] = ttp.register(host.bundle, host.model)
            first.set()
        except FreemarkError:
            pass  # the server died under this call: no receipt, so no promise was made

    burst = [threading.Thread(target=register, args=(i,)) for i in range(BURST)]
    for thread in burst:
        thread.start()
    try:
        assert first.wait(FIRST_RECEIPT_S), "no registration completed"
    finally:
        kill_9(server)
        for thread in burst:
            thread.join(FIRST_RECEIPT_S)
    lost = sorted(set(range(BURST)) - set(acknowledged))
    assert lost, "every registration finished before the kill; the test proved nothing"

    # What the database holds after the crash, before any server touches it again.
    store = open_store(db)
    try:
        entries = store.entries(0, store.tree_size())
        registrations = {r.registration_id: r for r in store.registrations_for_rewrap()}
        counts = audit(store, Verifier.from_pem(keys.public_key_pem))
    finally:
        store.close()
    assert counts["registrations"] == len(registrations)
    logged = {json.loads(e.entry)["registration_id"]: e.index for e in entries
              if e.kind == RECEIPT_KIND}
    assert logged == {rid: r.log_index for rid, r in registrations.items()}
    for receipt in acknowledged.values():
        assert logged.get(receipt.registration_id) == receipt.log_index
        verify_receipt(receipt, keys.public_key_pem)

    server = ServerProcess(tmp_path / "ttp", *server_args).start()
    try:
        index, receipt = next(iter(acknowledged.items()))
        with KeyServiceClient(server.address, token=tokens[ARBITER]) as judge:
            verdict = judge.verify(receipt.registration_id, hosts[index].weights)
        assert verdict.is_match and verdict.log_index == len(entries)

        retry = lost[0]
        committed = {r.owner: rid for rid, r in registrations.items()}.get(hosts[retry].owner)
        with KeyServiceClient(server.address, token=tokens[hosts[retry].owner]) as owner:
            if committed is None:
                assert owner.register(hosts[retry].bundle, hosts[retry].model).log_index > 0
            else:
                with pytest.raises(AlreadyRegisteredError, match=committed):
                    owner.register(hosts[retry].bundle, hosts[retry].model)
    finally:
        server.stop()
    final = json_out(run_cli("freemark_keyserver.cli", "audit", "--data-dir",
                             str(tmp_path / "ttp"), "--db", db, "--json",
                             env=cli_env(**keys.env())))
    assert final["ok"] is True and final["entries"] == len(entries) + 1 + (committed is None)


_APPENDER = """
import hashlib, sys, threading
from pathlib import Path
from freemark.records.types import VERDICT_KIND
from freemark.tlog.signatures import canonical_json
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.crypto import MasterKeyring, signing_key_from_pem
from freemark_keyserver.handlers.context import Context, append_entry, inclusion_proof
from freemark_keyserver.store import open_store
from signed_statements import verdict_body

db, key = sys.argv[1], Path(sys.argv[2])
ctx = Context(config=ServerConfig(data_dir=key.parent, db=db), store=open_store(db),
              keyring=MasterKeyring({1: bytes(32)}), signer=signing_key_from_pem(key.read_bytes()))
out = threading.Lock()

def client():
    while True:
        body, index, _ = append_entry(ctx, VERDICT_KIND, lambda i, t: canonical_json(
            verdict_body(i, integrated_time=t)))
        size = inclusion_proof(ctx, index).tree_size
        with out:
            print(index, hashlib.sha256(body).hexdigest(), size, flush=True)

for _ in range(int(sys.argv[3])):
    threading.Thread(target=client, daemon=True).start()
threading.Event().wait()
"""
APPENDERS = 16
ACKS_BEFORE_KILL = 200


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_during_a_burst_of_log_appends_loses_nothing_acknowledged(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """16 threads append statements through the sequencer (group commit: many entries and
    their checkpoint per transaction) until the process is killed with SIGKILL. Every entry
    whose append returned is in the log with the bytes it was given, under a stored
    checkpoint the audit accepts, and the log goes on from where the batch left it."""
    db = str(tmp_path / "ttp.sqlite3") if backend == "sqlite" else request.getfixturevalue("pg_db")
    key = tmp_path / "signing.pem"
    signer = load_or_create_signing_key(key)
    open_store(db).close()  # migrated before the burst
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        str(repo / p) for p in ("client", "keyserver", "tests"))}
    writer = subprocess.Popen([sys.executable, "-c", _APPENDER, db, str(key), str(APPENDERS)],
                              stdout=subprocess.PIPE, text=True, env=env)
    acknowledged: list[tuple[int, str, int]] = []
    try:
        assert writer.stdout is not None
        while len(acknowledged) < ACKS_BEFORE_KILL:
            line = writer.stdout.readline()
            assert line, "the appender died before the kill"
            index, digest, size = line.split()
            acknowledged.append((int(index), digest, int(size)))
        assert writer.poll() is None  # killed mid-burst, appends in flight
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    store = open_store(db)
    try:
        counts = audit(store, signer.verifier())  # every entry signed, every checkpoint true
        entries = {e.index: e for e in store.entries(0, store.tree_size())}
        for index, digest, size in acknowledged:
            assert hashlib.sha256(entries[index].entry).hexdigest() == digest
            assert store.checkpoint_at(size) is not None and size > index
        assert counts["entries"] == len(entries) >= len(acknowledged)
        assert counts["checkpoints"] < len(acknowledged)  # batches shared their checkpoints
        ctx = Context(config=ServerConfig(data_dir=tmp_path, db=db), store=store,
                      keyring=MasterKeyring({1: bytes(32)}), signer=signer)
        _, index, _ = append_entry(ctx, VERDICT_KIND, lambda i, t: canonical_json(
            verdict_body(i, integrated_time=t)))
        assert index == len(entries)
        assert inclusion_proof(ctx, index).tree_size == index + 1
    finally:
        store.close()


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return False


def _holding(root: Path, fragments: list[bytes]) -> list[Path]:
    """Files under `root` that contain any of `fragments`."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and any(f in path.read_bytes() for f in fragments):
                found.append(path)
        except OSError:
            continue
    return found


def test_kill_9_during_a_safetensors_verify_leaves_no_plaintext_host_on_disk(
        hosts: list[Host], tmp_path: Path) -> None:
    """The registered host is decrypted into a sealed memfd for the sandbox, never a file: a
    server killed mid-Verify leaves nothing of it behind, and its fork server and children
    go with it (they watch the server's control socket)."""
    db = str(tmp_path / "ttp.sqlite3")
    keys = shared_keys(tmp_path / "keys")
    host, suspect = hosts[0], hosts[1].weights  # another model's weights: not the host's bytes
    tokens = add_principals(db, fleet_principals([host]))
    server_args = ["--db", db, *keys.cli_args()]
    data_dir = tmp_path / "ttp"
    server = ServerProcess(data_dir, *server_args).start()
    with KeyServiceClient(server.address, token=tokens[host.owner], timeout=300) as owner:
        registration = owner.register(host.bundle, host.model).registration_id
    raw = host.model.read_bytes()
    fragments = [raw[i:i + 64] for i in range(len(raw) // 4, len(raw) - 64, len(raw) // 5)][:4]
    stop = threading.Event()

    def verify_until_killed() -> None:
        with KeyServiceClient(server.address, token=tokens[ARBITER], retries=0,
                              timeout=120) as judge:
            while not stop.is_set():
                try:
                    judge.verify(registration, suspect)
                except FreemarkError:
                    return
    caller = threading.Thread(target=verify_until_killed, daemon=True)
    caller.start()
    assert server.process is not None
    deadline = time.monotonic() + 120
    while not any(descendants(child) for child in descendants(server.process.pid)):
        assert time.monotonic() < deadline, "no sandbox child ever ran"
        time.sleep(0.002)
    sandbox = descendants(server.process.pid)
    server.process.send_signal(signal.SIGKILL)  # the server only: its sandbox must follow
    server.process.communicate(timeout=30)
    stop.set()
    caller.join(60)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in sandbox):
        assert time.monotonic() < deadline, "the sandbox outlived the killed server"
        time.sleep(0.05)
    assert _holding(data_dir, fragments) == []
    server = ServerProcess(data_dir, *server_args).start()
    try:
        assert _holding(data_dir, fragments) == []
    finally:
        server.stop()
