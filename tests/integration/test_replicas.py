"""Two key server replicas on one PostgreSQL, 32 concurrent clients registering and verifying
through both (scale-out issue).

Eight owners register eight independent hosts at once, each through one replica. Eight more
clients register the same hosts again through the other replica once the first registration is
acknowledged: the right answer is ALREADY_EXISTS naming the first, which shows the other
replica sees the write. Sixteen arbiters verify each host twice through the replica that did
not register it, once as a program and once as .safetensors weights, the second decrypting the
host the first replica stored. Then every acknowledged registration must read back from both
replicas and verify offline, the log must hold exactly one entry per acknowledged write and
nothing else, and `freemark-keyserver audit --db URL` must pass.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from freemark.audit.receipt import verify_receipt
from freemark.errors import AlreadyRegisteredError
from freemark.records.types import (
    COARSE_VERDICT_KIND,
    RECEIPT_KIND,
    VERDICT_KIND,
    AnyVerdict,
    Receipt,
)
from freemark.rpc import KeyServiceClient
from freemark_keyserver.store import open_store
from ttp_fixtures import cli_env, json_out, run_cli
from ttp_fleet import ARBITER, Host, add_principals, fleet_principals, shared_keys, start_replica

CLIENTS = 32
WAIT_S = 120.0


def test_32_clients_through_two_replicas_on_one_postgres(
    pg_db: str, hosts: list[Host], tmp_path: Path
) -> None:
    keys = shared_keys(tmp_path / "keys")
    tokens = add_principals(pg_db, fleet_principals(hosts))
    replicas = [start_replica(pg_db, tmp_path / f"replica{i}", keys) for i in range(2)]
    addresses = [f"127.0.0.1:{replica.port}" for replica in replicas]
    receipts: dict[int, Receipt] = {}
    refusals: dict[int, str] = {}
    verdicts: list[AnyVerdict] = []
    failures: list[BaseException] = []
    registered = [threading.Event() for _ in hosts]
    start = threading.Barrier(CLIENTS)

    def client(number: int) -> None:
        index, role = number % len(hosts), number // len(hosts)  # role 0 registers first
        host = hosts[index]
        address = addresses[(index + (role > 0)) % 2]
        token = tokens[ARBITER] if role >= 2 else tokens[host.owner]
        try:
            with KeyServiceClient(address, token=token, retries=0) as ttp:
                start.wait()
                if role == 0:
                    receipts[index] = ttp.register(host.bundle, host.model)
                    registered[index].set()
                    return
                assert registered[index].wait(WAIT_S), "the first registration never came"
                if role == 1:
                    try:
                        ttp.register(host.bundle, host.model)
                    except AlreadyRegisteredError as refused:
                        refusals[index] = refused.message
                    return
                registration = receipts[index].registration_id
                for suspect in (host.model, host.weights):
                    verdicts.append(ttp.verify(registration, suspect))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
            registered[index].set()  # let the others of this host finish

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        assert failures == []
        assert sorted(receipts) == list(range(len(hosts)))
        for index, message in refusals.items():
            assert receipts[index].registration_id in message
        assert len(refusals) == len(hosts), "a second registration of a host was accepted"
        assert len(verdicts) == 2 * (CLIENTS - 2 * len(hosts))
        assert all(verdict.is_match for verdict in verdicts)

        for statement in [*receipts.values(), *verdicts]:
            verify_receipt(statement, keys.public_key_pem)
        for address in addresses:
            with KeyServiceClient(address, token=tokens[ARBITER]) as ttp:
                listed = {info.registration_id for info in ttp.list_registrations()}
            assert listed == {r.registration_id for r in receipts.values()}
            for index, receipt in receipts.items():
                with KeyServiceClient(address, token=tokens[hosts[index].owner]) as owner:
                    info = owner.get_registration(receipt.registration_id)
                assert (info.log_index, info.host_fingerprint) == (
                    receipt.log_index, receipt.host_fingerprint)
    finally:
        for replica in replicas:
            replica.stop(grace=1)

    # Exactly one log entry per acknowledged write: the receipts and verdicts, nothing else.
    store = open_store(pg_db)
    try:
        entries = store.entries(0, store.tree_size())
    finally:
        store.close()
    bodies = {entry.index: json.loads(entry.entry) for entry in entries}
    assert len(entries) == len(receipts) + len(verdicts)
    assert {i: b["registration_id"] for i, b in bodies.items() if b["kind"] == RECEIPT_KIND} == {
        r.log_index: r.registration_id for r in receipts.values()}
    assert {i for i, b in bodies.items() if b["kind"] in (VERDICT_KIND, COARSE_VERDICT_KIND)} == {
        v.log_index for v in verdicts}

    audit = json_out(run_cli("freemark_keyserver.cli", "audit", "--db", pg_db, "--data-dir",
                             str(tmp_path / "auditor"), "--json", env=cli_env(**keys.env())))
    assert audit == {"ok": True, "entries": len(entries), "registrations": len(receipts),
                     "checkpoints": audit["checkpoints"]}
