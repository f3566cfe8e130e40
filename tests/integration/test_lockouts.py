"""No principal, and no token-less peer, can lock another out (issue 18 item 5), over a real
key server on loopback with a real store, sandbox and models.

One module-scoped server with small budgets configured for tests: a registration may be
verified 3 times an hour by callers other than its owner, a principal may hold half of a
1 MiB spool, a stream lasts at most 8 s, a health/reflection stream 3 s, and a principal may
Register 6 times an hour. It listens on `localhost`, IPv4 and IPv6, so that two loopback
peers with different addresses exist. Checks are on statuses, reasons and files, never on
how fast anything is.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from freemark.derive import derive_key
from freemark.formats.pt2 import load_program
from freemark.scheme.bundle import to_proto
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import EXEMPT_STREAMS, EXEMPT_STREAMS_PER_PEER, Rate, ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models

S = grpc.StatusCode
SPOOL_QUOTA = 1024 * 1024
SHARE = 0.5
MAX_STREAM_SECONDS = 8.0
EXEMPT_LIFETIME = 3.0
REGISTRATION_RATE = 3  # Verify calls an hour by callers other than the owner (and by the owner)
REGISTER_RATE = 6  # Register calls an hour by one principal
PRINCIPALS = {"owner_a": "owner", "owner_b": "owner", "owner_c": "owner", "owner_d": "owner",
              "owner_e": "owner", "arbiter_1": "arbiter", "arbiter_2": "arbiter",
              "admin": "admin"}
WAIT = 120.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Refusal:
    code: grpc.StatusCode
    reason: str | None
    message: str
    retry_after: float | None


def refusal(exc: BaseException | None) -> Refusal:
    assert isinstance(exc, grpc.RpcError), exc
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    reason, retry = None, None
    for detail in status.details if status else ():
        info, wait = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(wait.DESCRIPTOR):
            detail.Unpack(wait)
            retry = wait.retry_delay.ToMilliseconds() / 1000
    return Refusal(exc.code(), reason, exc.details() or "", retry)  # type: ignore[attr-defined]


@dataclass
class World:
    running: RunningServer
    files: ModelFiles
    tokens: dict[str, str]
    bundles: dict[str, pb.KeyBundle]
    channel: grpc.Channel
    stub: keyservice_pb2_grpc.KeyServiceStub
    registration_id: str

    def md(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[who]}")]

    def spool_bytes(self) -> list[int]:
        return [f.stat().st_size for f in self.running.ctx.config.spool_dir.iterdir()]


def _upload(data: bytes) -> pb.UploadHeader:
    return pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                           format=pb.MODEL_FORMAT_PT2)


def _chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("lockouts")
    files = build_models(folder)
    config = ServerConfig(
        data_dir=folder / "ttp", listen="localhost:0", grace_seconds=1,
        max_upload_bytes=SPOOL_QUOTA, spool_quota_bytes=SPOOL_QUOTA, spool_principal_share=SHARE,
        spool_memory_bytes=0,  # these tests watch the disk spool's files
        min_upload_rate=2 * 1024, upload_rate_grace=2.0, max_stream_seconds=MAX_STREAM_SECONDS,
        exempt_stream_lifetime=EXEMPT_LIFETIME, principal_recheck=0.2,
        verify_rate_principal=Rate.parse("100/hour"),
        verify_rate_registration=Rate(REGISTRATION_RATE, 3600.0),
        register_rate_principal=Rate(REGISTER_RATE, 3600.0))
    running = create_server(config)
    tokens = {}
    for name, role in PRINCIPALS.items():
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    host = load_program(files.host)
    triggers = load_triggers(files.triggers)
    bundles = {name: to_proto(derive_key(host, layer="act", owner=name, triggers=triggers))
               for name, role in PRINCIPALS.items() if role == "owner"}
    # owner_c registers a model of its own (the prior-claim check refuses the host again).
    bundles["owner_c"] = to_proto(derive_key(load_program(files.independent), layer="act",
                                             owner="owner_c", triggers=triggers))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = keyservice_pb2_grpc.KeyServiceStub(channel)
    data = files.host.read_bytes()
    receipt = stub.Register(iter([pb.RegisterRequest(header=pb.RegisterHeader(
        bundle=bundles["owner_a"], upload=_upload(data)))]
        + [pb.RegisterRequest(chunk=c) for c in _chunks(data)]),
        metadata=[("authorization", f"Bearer {tokens['owner_a']}")], timeout=300)
    yield World(running, files, tokens, bundles, channel, stub, receipt.registration_id)
    channel.close()
    running.stop(grace=1)


def test_header_only_calls_by_others_leave_the_owners_verify_available(world: World) -> None:
    """Issue 18 5(a): 20 header-only Verify calls by arbiters and an admin (nothing uploaded,
    nothing judged) drained the registration's one bucket, and the owner's own Verify was
    RATE_LIMITED. Now only a completed upload is charged, and the owner has a bucket of its
    own: even arbiters who complete uploads and drain theirs leave the owner's alone."""
    suspect = world.files.finetuned.read_bytes()
    header = pb.VerifyHeader(registration_id=world.registration_id, upload=_upload(suspect))
    callers = ("arbiter_1", "arbiter_2", "admin")
    for i in range(20):
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Verify(iter([pb.VerifyRequest(header=header)]),
                              metadata=world.md(callers[i % 3]), timeout=WAIT)
        r = refusal(caught.value)
        assert (r.code, r.reason) == (S.DATA_LOSS, "UPLOAD_CORRUPT"), r
        assert "stream ended after 0 of" in r.message
    # Arbiters who complete their uploads (junk bytes, judged INVALID_MODEL) spend the
    # budget of callers other than the owner...
    junk = os.urandom(4096)
    junk_header = pb.VerifyHeader(registration_id=world.registration_id, upload=_upload(junk))
    for _ in range(REGISTRATION_RATE):
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Verify(iter([pb.VerifyRequest(header=junk_header),
                                    pb.VerifyRequest(chunk=junk)]),
                              metadata=world.md("arbiter_1"), timeout=WAIT)
        assert refusal(caught.value).reason != "RATE_LIMITED"
    # ...and then the next one is refused before its upload is read, with a retry hint.
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.Verify(iter([pb.VerifyRequest(header=header)]), metadata=world.md("admin"),
                          timeout=WAIT)
    r = refusal(caught.value)
    assert (r.code, r.reason) == (S.RESOURCE_EXHAUSTED, "RATE_LIMITED"), r
    assert r.retry_after is not None and r.retry_after > 60
    assert "other than its owner" in r.message
    # The owner's Verify is served: a signed verdict on the stolen copy.
    verdict = world.stub.Verify(iter([pb.VerifyRequest(header=header)]
                                     + [pb.VerifyRequest(chunk=c) for c in _chunks(suspect)]),
                                metadata=world.md("owner_a"), timeout=300)
    assert verdict.registration_id == world.registration_id


def test_slow_streams_of_one_principal_cannot_hold_the_spool_from_another(world: World) -> None:
    """Issue 18 5(b): the spool was reserved at the announced size, so one owner's slow
    streams announcing large held the whole quota and everyone else got SPOOL_FULL. Now an
    upload holds what has arrived, one principal at most its share, and a stream at most
    MAX_STREAM_SECONDS; another principal's Register goes through meanwhile."""
    announced = b"\1" * 500_000  # each announces nearly a share (a half of the quota)...
    sent_fast = 120 * 1024  # ...sends this much at once, then trickles above the minimum rate
    release = threading.Event()

    def slow() -> Iterator[pb.RegisterRequest]:
        yield pb.RegisterRequest(header=pb.RegisterHeader(bundle=world.bundles["owner_b"],
                                                          upload=_upload(announced)))
        yield from (pb.RegisterRequest(chunk=c) for c in _chunks(announced[:sent_fast]))
        for start in range(sent_fast, len(announced), 512):  # 5 KB/s
            if release.wait(0.1):
                return
            yield pb.RegisterRequest(chunk=announced[start:start + 512])

    holders = [world.stub.Register.future(slow(), metadata=world.md("owner_b"), timeout=WAIT)
               for _ in range(5)]
    try:
        deadline = time.monotonic() + MAX_STREAM_SECONDS / 2
        while sum(world.spool_bytes()) < 4 * 100_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(world.spool_bytes()) >= 4 * 100_000, world.spool_bytes()
        # Another principal's upload (a model of its own) is spooled and registered.
        data = world.files.independent.read_bytes()
        receipt = world.stub.Register(
            iter([pb.RegisterRequest(header=pb.RegisterHeader(bundle=world.bundles["owner_c"],
                                                              upload=_upload(data)))]
                 + [pb.RegisterRequest(chunk=c) for c in _chunks(data)]),
            metadata=world.md("owner_c"), timeout=300)
        assert receipt.registration_id
        # The slow principal's own streams: refused SPOOL_FULL past its share, or ended at
        # the maximum stream duration; none completed, and their files went with them.
        reasons = []
        for holder in holders:
            r = refusal(holder.exception(timeout=WAIT))
            reasons.append(r.reason)
            if r.reason == "SPOOL_FULL":
                assert r.code == S.RESOURCE_EXHAUSTED and r.retry_after, r
                assert "share" in r.message
            else:
                assert (r.code, r.reason) == (S.DEADLINE_EXCEEDED, "UPLOAD_STALLED"), r
                assert f"maximum of {MAX_STREAM_SECONDS:g} s" in r.message
        assert "SPOOL_FULL" in reasons and "UPLOAD_STALLED" in reasons, reasons
    finally:
        release.set()
    assert world.spool_bytes() == []


def test_anonymous_watch_streams_from_one_peer_cannot_take_every_exempt_slot(
        world: World) -> None:
    """Issue 18 5(c): eight token-less health Watch streams held every exempt slot, and every
    other Watch and reflection call got RESOURCE_EXHAUSTED. Now one peer holds at most its
    share, a peer holding nothing is always served, and each stream ends after its lifetime."""
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here: two loopback peers need two addresses")
    flood_channels = [grpc.insecure_channel(f"127.0.0.1:{world.running.port}")
                      for _ in range(EXEMPT_STREAMS + 2)]
    other = grpc.insecure_channel(f"[::1]:{world.running.port}")
    try:
        watches = [health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(service=""),
                                                       timeout=WAIT) for c in flood_channels]
        held, refused = [], []
        for watch in watches:
            try:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                held.append(watch)
            except grpc.RpcError as exc:
                assert exc.code() == S.RESOURCE_EXHAUSTED, exc  # type: ignore[attr-defined]
                refused.append(watch)
        assert len(held) == EXEMPT_STREAMS_PER_PEER and len(refused) == len(watches) - len(held)
        # Another peer: its Watch and a reflection call are served while the flood holds.
        mine = health_pb2_grpc.HealthStub(other).Watch(
            health_pb2.HealthCheckRequest(service="freemark.v1.KeyService"), timeout=WAIT)
        assert next(mine).status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(other).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT)
        assert "freemark.v1.KeyService" in {
            s.name for s in next(answers).list_services_response.service}
        # The flood's held streams end after their lifetime (a health client re-watches).
        for watch in held:
            with pytest.raises(grpc.RpcError) as caught:
                for _ in watch:
                    pass
            assert caught.value.code() == S.CANCELLED  # type: ignore[attr-defined]
        mine.cancel()
        deadline = time.monotonic() + WAIT
        while world.running.calls.exempt_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world.running.calls.exempt_streams() == 0
    finally:
        for channel in [*flood_channels, other]:
            channel.close()


def test_a_burst_of_registers_is_rate_limited_per_principal(world: World) -> None:
    """Issue 18 item 1/4: Register was not rate-limited, so its outcome and latency could be
    asked about other owners' triggers as often as one liked. Now each principal has a bucket
    (REGISTER_RATE an hour here), charged before anything is read; another principal is not
    affected."""
    header = pb.RegisterHeader(bundle=world.bundles["owner_d"],
                               upload=_upload(world.files.host.read_bytes()))

    def header_only(who: str) -> Refusal:
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Register(iter([pb.RegisterRequest(header=header)]),
                                metadata=world.md(who), timeout=WAIT)
        return refusal(caught.value)

    outcomes = [header_only("owner_d") for _ in range(REGISTER_RATE + 2)]
    assert [r.reason for r in outcomes] == \
        ["UPLOAD_CORRUPT"] * REGISTER_RATE + ["RATE_LIMITED"] * 2
    for r in outcomes[REGISTER_RATE:]:
        assert r.code == S.RESOURCE_EXHAUSTED and r.retry_after is not None
        assert r.retry_after > 60 and "Register calls are limited to 6/hour" in r.message
    # Another principal's Register is admitted: it is read (and refused only for its content:
    # the bundle names owner_d).
    r = header_only("owner_e")
    assert (r.code, r.reason) == (S.PERMISSION_DENIED, "PERMISSION_DENIED"), r

