"""Load on two replicas, and load shedding at the concurrency limit (scale-out issue).

32 clients send a mix of the cheap calls (GetRegistration, ListRegistrations, GetCheckpoint,
GetInclusionProof, GetPublicKey) through two replicas on one PostgreSQL, and none may fail.
The issue asks for 1,000 requests per client; on two shared cores that is a minute of CPU, so
the test sends REQUESTS_PER_CLIENT each and `bench/keyserver.py` sends the full 32 x 1,000.

With `--max-concurrent-rpcs` at 4 and four slow uploads holding every slot, further calls must
get RESOURCE_EXHAUSTED at once, not queue behind the slow ones; once the uploads end, the
server serves again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from freemark.audit.receipt import verify_checkpoint
from freemark.errors import ResourceExhaustedError
from freemark.records.types import Receipt
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import to_proto
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from ttp_fixtures import ServerProcess
from ttp_fleet import ARBITER, Host, add_principals, fleet_principals, shared_keys, start_replica

CLIENTS = 32
REQUESTS_PER_CLIENT = 150
CALLS = ("get_registration", "list_registrations", "get_checkpoint", "get_inclusion_proof",
         "get_public_key")

SLOTS = 4
EXCESS_CALLS = 16
PROMPT_S = 1.0  # an excess call must be answered within this, while the slow ones still hold
FILL_S = 30.0
SETTLE_S = 0.2  # for calls already sent to reach the server


def test_32_clients_of_mixed_cheap_calls_through_two_replicas_without_errors(
    pg_db: str, hosts: list[Host], tmp_path: Path
) -> None:
    keys = shared_keys(tmp_path / "keys")
    tokens = add_principals(pg_db, fleet_principals(hosts))
    replicas = [start_replica(pg_db, tmp_path / f"replica{i}", keys) for i in range(2)]
    addresses = [f"127.0.0.1:{replica.port}" for replica in replicas]
    try:
        receipts: list[Receipt] = []
        for i, host in enumerate(hosts):
            with KeyServiceClient(addresses[i % 2], token=tokens[host.owner]) as owner:
                receipts.append(owner.register(host.bundle, host.model))
        size = len(hosts)
        failures: list[BaseException] = []
        answered = [0] * CLIENTS
        start = threading.Barrier(CLIENTS)

        def client(number: int) -> None:
            index = number % len(hosts)
            name = ARBITER if number % 3 == 0 else hosts[index].owner
            try:
                with KeyServiceClient(addresses[number % 2], token=tokens[name]) as ttp:
                    start.wait()
                    for n in range(REQUESTS_PER_CLIENT):
                        call = CALLS[(number + n) % len(CALLS)]
                        if call == "get_registration":
                            info = ttp.get_registration(receipts[index].registration_id)
                            assert info.log_index == receipts[index].log_index
                        elif call == "list_registrations":
                            listed = list(ttp.list_registrations(page_size=5))
                            assert len(listed) == (size if name == ARBITER else 1)
                        elif call == "get_checkpoint":
                            assert ttp.get_checkpoint().tree_size == size
                        elif call == "get_inclusion_proof":
                            proof = ttp.get_inclusion_proof(n % size)
                            assert (proof.log_index, proof.tree_size) == (n % size, size)
                        else:
                            assert ttp.public_key() == keys.public_key_pem
                        answered[number] += 1
                    verify_checkpoint(ttp.get_checkpoint(), keys.public_key_pem)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert answered == [REQUESTS_PER_CLIENT] * CLIENTS
    finally:
        for replica in replicas:
            replica.stop(grace=1)


def _slow_upload(host: Host, started: threading.Event, gate: threading.Event
                 ) -> Iterator[pb.RegisterRequest]:
    """A Register upload that stalls after its first byte until `gate` opens, then ends with
    a checksum that cannot match, so it finishes without running the sandbox. `started` is
    set once gRPC asks for more than the first byte: the call is under way."""
    upload = pb.UploadHeader(total_size=2, sha256=bytes(32), format=pb.MODEL_FORMAT_PT2)
    yield pb.RegisterRequest(header=pb.RegisterHeader(bundle=to_proto(host.bundle), upload=upload))
    yield pb.RegisterRequest(chunk=b"x")
    started.set()
    gate.wait()
    yield pb.RegisterRequest(chunk=b"y")


def test_excess_calls_get_resource_exhausted_promptly_while_slow_calls_hold_the_slots(
    hosts: list[Host], tmp_path: Path
) -> None:
    keys = shared_keys(tmp_path / "keys")
    db = str(tmp_path / "ttp.sqlite3")
    tokens = add_principals(db, fleet_principals(hosts[:1]))
    server = ServerProcess(tmp_path / "ttp", "--db", db, *keys.cli_args(),
                           "--max-concurrent-rpcs", str(SLOTS)).start()
    gate = threading.Event()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = keyservice_pb2_grpc.KeyServiceStub(channel)
        metadata = (("authorization", f"Bearer {tokens[hosts[0].owner]}"),)
        started = [threading.Event() for _ in range(SLOTS)]
        slow = [stub.Register.future(_slow_upload(hosts[0], event, gate), metadata=metadata,
                                     timeout=60) for event in started]
        # A probe sent before every slow upload is in could take a slot from one of them.
        assert all(event.wait(FILL_S) for event in started)
        time.sleep(SETTLE_S)
        with KeyServiceClient(server.address, token=tokens[ARBITER], retries=0) as probe:
            deadline = time.monotonic() + FILL_S
            while True:  # until the slow uploads hold every slot
                assert not any(call.done() for call in slow), "a slow upload ended early"
                try:
                    probe.public_key()
                except ResourceExhaustedError:
                    break
                assert time.monotonic() < deadline, "the slow uploads never filled the slots"
                time.sleep(0.05)

        latencies: list[float] = []
        outcomes: list[BaseException | None] = []

        def excess() -> None:
            with KeyServiceClient(server.address, token=tokens[ARBITER], retries=0) as ttp:
                began = time.monotonic()
                try:
                    ttp.public_key()
                    outcomes.append(None)
                except ResourceExhaustedError as exc:
                    outcomes.append(exc)
                latencies.append(time.monotonic() - began)

        callers = [threading.Thread(target=excess) for _ in range(EXCESS_CALLS)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert not any(call.done() for call in slow), "a slow upload ended early"
        assert all(isinstance(o, ResourceExhaustedError) for o in outcomes)
        assert len(latencies) == EXCESS_CALLS and max(latencies) < PROMPT_S, latencies

        gate.set()
        for call in slow:
            with pytest.raises(grpc.RpcError) as refused:
                call.result(timeout=30)
            assert refused.value.code() == grpc.StatusCode.DATA_LOSS  # the checksum, as planned
        with KeyServiceClient(server.address, token=tokens[ARBITER]) as ttp:
            assert ttp.public_key() == keys.public_key_pem
    finally:
        gate.set()
        channel.close()
        server.stop()
