"""Stream discipline, rate limits and operator visibility, over a real server on loopback.

One module-scoped server with short limits configured for tests (an idle timeout of five
seconds, a watchdog that re-reads principals ten times a second): idle and stalled streams
are closed and leave no spool file, one principal's flood does not stop another's calls
or a health check, the spool quota refuses the excess, Verify's token bucket refuses the
21st... call of one arbiter while another is served, a disabled principal's open stream is
ended, the metrics page moves with a Register, and no refusal names a server path. Nothing
here asserts how fast anything is: each check is on statuses, reasons, files and counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from freemark.derive import derive_key
from freemark.formats.pt2 import load_program
from freemark.scheme.bundle import to_proto
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver import logs
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import Rate, ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal, open_store
from ttp_fixtures import ModelFiles, build_models

S = grpc.StatusCode
PER_PRINCIPAL = 8
IDLE_SECONDS = 5.0
UPLOAD_CAP = 4 * 1024 * 1024
SPOOL_QUOTA = 6 * 1024 * 1024
OWNERS = ("owner_a", "owner_b", "owner_c", "owner_d")
ARBITERS = ("arbiter_1", "arbiter_2")
WAIT = 120.0  # generous bound on a future; the checks are on what comes back, not when


@dataclass
class Refusal:
    code: grpc.StatusCode
    reason: str | None
    message: str
    retry_after: float | None


@dataclass
class World:
    running: RunningServer
    files: ModelFiles
    data_dir: Path
    tokens: dict[str, str]
    headers: dict[str, pb.RegisterHeader]
    channel: grpc.Channel
    stub: keyservice_pb2_grpc.KeyServiceStub
    log_lines: list[str]
    registration_id: str = ""
    metrics_before: str = ""
    metrics_after: str = ""
    register_request_id: str = ""
    messages: list[str] = field(default_factory=list)  # every refusal message seen

    def md(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[who]}")]

    def scrape(self) -> str:
        port = self.running.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
            return str(page.read().decode())

    def refusal(self, exc: grpc.RpcError) -> Refusal:
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
        self.messages.append(exc.details() or "")
        return Refusal(exc.code(), reason, exc.details() or "", retry)

    def spool_files(self) -> list[Path]:
        return list(self.running.ctx.config.spool_dir.iterdir())


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines
        self.setFormatter(logs.JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _upload(data: bytes) -> pb.UploadHeader:
    return pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                           format=pb.MODEL_FORMAT_PT2)


def _chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def _readers() -> int:
    return sum(t.name == "freemark-stream-reader" for t in threading.enumerate())


def _stalling(messages: list[object], release: threading.Event) -> Iterator[object]:
    """Send `messages`, then nothing until `release` (a client that stops mid-upload)."""
    yield from messages
    release.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("streams")
    files = build_models(folder)
    data_dir = folder / "ttp"
    # A file a crashed run left in the spool: start-up must remove it.
    (data_dir / "spool").mkdir(parents=True)
    (data_dir / "spool" / "upload-left-by-a-crash.pt2").write_bytes(b"plaintext host")
    config = ServerConfig(
        data_dir=data_dir, listen="127.0.0.1:0", max_upload_bytes=UPLOAD_CAP, grace_seconds=2,
        max_calls_per_principal=PER_PRINCIPAL, stream_idle_timeout=IDLE_SECONDS,
        min_upload_rate=256 * 1024, upload_rate_grace=6.0, principal_recheck=0.1,
        spool_quota_bytes=SPOOL_QUOTA, spool_principal_share=1.0,
        spool_memory_bytes=0,  # these tests watch the disk spool's files
        verify_rate_principal=Rate.parse("2/hour"),
        verify_rate_registration=Rate.parse("100/hour"), metrics_listen="127.0.0.1:0")
    lines: list[str] = []
    handler = _ListHandler(lines)
    logging.getLogger("freemark_keyserver").addHandler(handler)
    logging.getLogger("freemark_keyserver").setLevel(logging.INFO)
    running = create_server(config)
    tokens = {}
    for name in OWNERS + ARBITERS:
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, "owner" if name in OWNERS else "arbiter",
                                                  hash_token(tokens[name]), 0))
    host = load_program(files.host)
    triggers = load_triggers(files.triggers)
    headers = {name: pb.RegisterHeader(bundle=to_proto(derive_key(
        host, layer="act", owner=name, triggers=triggers)), upload=_upload(files.host.read_bytes()))
        for name in OWNERS}
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    w = World(running, files, data_dir, tokens, headers, channel,
              keyservice_pb2_grpc.KeyServiceStub(channel), lines)
    # The metrics page before and after one real Register, kept for the metrics test.
    w.metrics_before = w.scrape()
    data = files.host.read_bytes()
    receipt, call = w.stub.Register.with_call(
        iter([pb.RegisterRequest(header=headers["owner_a"])]
             + [pb.RegisterRequest(chunk=c) for c in _chunks(data)]),
        metadata=w.md("owner_a"), timeout=300)
    w.registration_id = receipt.registration_id
    w.register_request_id = dict(call.trailing_metadata())[logs.REQUEST_ID_KEY]
    w.metrics_after = w.scrape()
    yield w
    channel.close()
    running.stop(grace=1)
    logging.getLogger("freemark_keyserver").removeHandler(handler)


def _value(page: str, name: str, **labels: str) -> float:
    """One sample of the metrics page (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_start_up_cleared_the_spool_of_a_crashed_run(world: World) -> None:
    assert not (world.data_dir / "spool" / "upload-left-by-a-crash.pt2").exists()


def test_metrics_page_moves_with_a_register_and_logs_carry_the_request_id(world: World) -> None:
    before, after = world.metrics_before, world.metrics_after
    method = {"method": "KeyService/Register"}
    assert _value(after, "freemark_rpc_handled_total", **method, code="OK") == \
        _value(before, "freemark_rpc_handled_total", **method, code="OK") + 1
    assert _value(after, "freemark_rpc_duration_seconds_count", **method) == \
        _value(before, "freemark_rpc_duration_seconds_count", **method) + 1
    assert _value(after, "freemark_log_entries") == _value(before, "freemark_log_entries") + 1
    # The sandbox ran the host (and the null panel) for that Register.
    assert _value(after, "freemark_sandbox_run_seconds_count") > \
        _value(before, "freemark_sandbox_run_seconds_count")
    for name in ("freemark_sandbox_queue_depth", "freemark_sandbox_running",
                 "freemark_spool_bytes", "process_resident_memory_bytes"):
        assert f"\n{name} " in after, f"{name} missing from the metrics page"
    assert "# TYPE freemark_sandbox_kills_total counter" in after
    # The id the client got back names the server's log line for its call.
    records = [json.loads(line) for line in world.log_lines]
    mine = [r for r in records if r.get("request_id") == world.register_request_id]
    assert any(r.get("method") == "KeyService/Register" and r.get("code") == "OK"
               and r.get("principal") == "owner_a" for r in mine), mine
    assert any("registered" in r["message"] for r in mine), "handler lines carry the id too"


def test_idle_streams_of_one_principal_starve_nobody_and_are_closed(world: World) -> None:
    release = threading.Event()
    header = [pb.RegisterRequest(header=world.headers["owner_b"])]
    futures = [world.stub.Register.future(_stalling(header, release), metadata=world.md("owner_b"),
                                          timeout=WAIT) for _ in range(64)]
    try:
        refused = []
        deadline = time.monotonic() + WAIT
        while len(refused) < 64 - PER_PRINCIPAL and time.monotonic() < deadline:
            refused = [f for f in futures if f.done()]
            time.sleep(0.05)
        # Beyond the per-principal cap: refused at once, with a reason and a retry hint.
        assert len(refused) == 64 - PER_PRINCIPAL
        for f in refused:
            r = world.refusal(f.exception())
            assert (r.code, r.reason) == (S.RESOURCE_EXHAUSTED, "RATE_LIMITED"), r
            assert r.retry_after is not None and r.retry_after > 0
        # While eight idle streams are open: another principal is served, health answers,
        # reflection lists the services.
        assert world.running.calls.open_calls("owner_b") == PER_PRINCIPAL
        listing = world.stub.ListRegistrations(pb.ListRegistrationsRequest(),
                                               metadata=world.md("owner_a"), timeout=30)
        assert [r.registration_id for r in listing.registrations] == [world.registration_id]
        health = health_pb2_grpc.HealthStub(world.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(world.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        services = {s.name for s in next(answers).list_services_response.service}
        assert "freemark.v1.KeyService" in services
        # The idle ones are closed by the idle timeout, and their spool files go with them.
        for f in futures:
            if f not in refused:
                r = world.refusal(f.exception(timeout=WAIT))
                assert (r.code, r.reason) == (S.DEADLINE_EXCEEDED, "UPLOAD_STALLED"), r
                assert "idle timeout" in r.message
    finally:
        release.set()
    assert world.running.calls.open_calls("owner_b") == 0
    assert world.spool_files() == []


def test_stalled_uploads_are_closed_and_their_spool_files_removed(world: World) -> None:
    data = world.files.host.read_bytes()
    release = threading.Event()
    futures = []
    try:
        for i in range(20):  # five each from four owners: each stays under its own cap
            owner = OWNERS[i % 4]
            first = [pb.RegisterRequest(header=world.headers[owner])] + \
                [pb.RegisterRequest(chunk=c) for c in _chunks(data[:len(data) // 2])]
            futures.append(world.stub.Register.future(_stalling(first, release),
                                                      metadata=world.md(owner), timeout=WAIT))
        deadline = time.monotonic() + WAIT
        while len(world.spool_files()) < 20 and time.monotonic() < deadline \
                and not all(f.done() for f in futures):
            time.sleep(0.05)
        assert len(world.spool_files()) == 20 or all(f.done() for f in futures)
        for f in futures:
            r = world.refusal(f.exception(timeout=WAIT))
            assert (r.code, r.reason) == (S.DEADLINE_EXCEEDED, "UPLOAD_STALLED"), r
    finally:
        release.set()
    assert world.spool_files() == []
    assert world.running.calls.open_calls("owner_c") == 0
    # Each stream's reader thread ends with its call: nothing piles up behind closed streams.
    deadline = time.monotonic() + WAIT
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _readers() == 0


def test_a_trickling_upload_is_closed_by_the_minimum_rate(world: World) -> None:
    data = world.files.host.read_bytes()

    def trickle() -> Iterator[pb.RegisterRequest]:
        yield pb.RegisterRequest(header=world.headers["owner_c"])
        for start in range(0, len(data), 64):  # 64 bytes every 0.2 s: never idle, far too slow
            yield pb.RegisterRequest(chunk=data[start:start + 64])
            time.sleep(0.2)

    with pytest.raises(grpc.RpcError) as caught:
        world.stub.Register(trickle(), metadata=world.md("owner_c"), timeout=WAIT)
    r = world.refusal(caught.value)
    assert (r.code, r.reason) == (S.DEADLINE_EXCEEDED, "UPLOAD_STALLED"), r
    assert "minimum" in r.message
    assert world.spool_files() == []


def test_the_spool_quota_refuses_the_excess(world: World) -> None:
    big = b"\0" * (UPLOAD_CAP - 1)
    held = 3 * 1024 * 1024  # what the first upload sends before it stops to hold its place
    release = threading.Event()

    def holding() -> Iterator[pb.RegisterRequest]:
        yield pb.RegisterRequest(header=pb.RegisterHeader(bundle=world.headers["owner_d"].bundle,
                                                          upload=_upload(big)))
        yield from (pb.RegisterRequest(chunk=c) for c in _chunks(big[:held]))
        release.wait()  # then nothing: within the idle timeout, the bytes sent stay held

    holder = world.stub.Register.future(holding(), metadata=world.md("owner_d"), timeout=WAIT)
    try:
        deadline = time.monotonic() + IDLE_SECONDS / 2
        while sum(f.stat().st_size for f in world.spool_files()) < held \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not holder.done(), "the first upload must be holding its bytes"
        # The next large upload passes the quota as its bytes arrive: refused at that chunk,
        # and its partial file removed.
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Register(iter([pb.RegisterRequest(header=pb.RegisterHeader(
                bundle=world.headers["owner_a"].bundle, upload=_upload(big)))]
                + [pb.RegisterRequest(chunk=c) for c in _chunks(big)]),
                metadata=world.md("owner_a"), timeout=WAIT)
        r = world.refusal(caught.value)
        assert (r.code, r.reason) == (S.RESOURCE_EXHAUSTED, "SPOOL_FULL"), r
        assert r.retry_after is not None and str(SPOOL_QUOTA) in r.message
        assert len(world.spool_files()) == 1
    finally:
        release.set()
    # The holder's client stopped sending: its stream ended short of the announced size
    # (or, on a slow machine, the idle timeout closed it first).
    assert world.refusal(holder.exception(timeout=WAIT)).reason in ("UPLOAD_CORRUPT",
                                                                    "UPLOAD_STALLED")
    assert world.spool_files() == []
    assert _value(world.scrape(), "freemark_spool_bytes") == 0


def test_verify_rate_limit_refuses_one_arbiter_and_serves_another(world: World) -> None:
    data = world.files.finetuned.read_bytes()

    def verify(who: str) -> pb.SignedVerdict:
        header = pb.VerifyHeader(registration_id=world.registration_id, upload=_upload(data))
        requests = [pb.VerifyRequest(header=header)] + [pb.VerifyRequest(chunk=c)
                                                        for c in _chunks(data)]
        return world.stub.Verify(iter(requests), metadata=world.md(who), timeout=300)

    outcomes: list[str] = []
    for _ in range(20):
        try:
            verify("arbiter_1")
            outcomes.append("OK")
        except grpc.RpcError as exc:
            r = world.refusal(exc)
            assert (r.code, r.reason) == (S.RESOURCE_EXHAUSTED, "RATE_LIMITED"), r
            assert r.retry_after is not None and r.retry_after > 60  # 2/hour: a half-hour wait
            assert f"retry in {math.ceil(r.retry_after)} s" in r.message
            outcomes.append("RATE_LIMITED")
    assert outcomes == ["OK", "OK"] + ["RATE_LIMITED"] * 18
    verdict = verify("arbiter_2")
    assert verdict.registration_id == world.registration_id


def test_a_disabled_principals_open_stream_is_ended(world: World) -> None:
    release = threading.Event()
    first = [pb.RegisterRequest(header=world.headers["owner_c"])]
    future = world.stub.Register.future(_stalling(first, release), metadata=world.md("owner_c"),
                                        timeout=WAIT)
    try:
        deadline = time.monotonic() + WAIT
        while world.running.calls.open_calls("owner_c") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        # As `freemark-keyserver principal disable` does: another connection to the store.
        store = open_store(world.running.ctx.config.database)
        try:
            store.disable_principal("owner_c")
        finally:
            store.close()
        r = world.refusal(future.exception(timeout=WAIT))
    finally:
        release.set()
    assert (r.code, r.reason) == (S.UNAUTHENTICATED, "UNAUTHENTICATED"), r
    assert "disabled" in r.message
    assert world.spool_files() == []


def test_a_deferred_sha256_is_checked_before_the_upload_is_used(world: World) -> None:
    """An upload header may leave the SHA-256 empty and send it after the last chunk (the
    client hashes while it sends, reading the bytes once): a missing, wrong, misplaced or
    doubled one is refused before anything reads the file, nothing is logged, and the
    spool is left empty."""
    data = bytes(range(256)) * 400
    digest = hashlib.sha256(data).digest()
    deferred = pb.UploadHeader(total_size=len(data), format=pb.MODEL_FORMAT_PT2)
    chunks = [pb.RegisterRequest(chunk=c) for c in _chunks(data, 30_000)]

    def register(upload: pb.UploadHeader, parts: list[pb.RegisterRequest]) -> Refusal:
        first = pb.RegisterRequest(header=pb.RegisterHeader(
            bundle=world.headers["owner_b"].bundle, upload=upload))
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Register(iter([first, *parts]), metadata=world.md("owner_b"),
                                timeout=WAIT)
        return world.refusal(caught.value)

    size = world.running.ctx.store.tree_size()
    never = register(deferred, chunks)
    wrong = register(deferred, [*chunks, pb.RegisterRequest(sha256=bytes(32))])
    short = register(deferred, [*chunks, pb.RegisterRequest(sha256=digest[:16])])
    late = register(deferred, [*chunks[:-1], pb.RegisterRequest(sha256=digest), chunks[-1]])
    twice = register(_upload(data), [*chunks, pb.RegisterRequest(sha256=digest)])
    for refusal in (never, wrong, short):
        assert (refusal.code, refusal.reason) == (S.DATA_LOSS, "UPLOAD_CORRUPT"), refusal
    assert "SHA-256" in never.message and "deferred" in never.message
    assert (late.code, late.reason) == (S.INVALID_ARGUMENT, "MALFORMED_REQUEST"), late
    assert "after its last chunk" in late.message
    assert (twice.code, twice.reason) == (S.INVALID_ARGUMENT, "MALFORMED_REQUEST"), twice
    assert "twice" in twice.message
    assert world.running.ctx.store.tree_size() == size
    assert world.spool_files() == []


def test_no_refusal_names_a_server_path(world: World) -> None:
    assert world.messages, "the tests above collect the refusals they saw"
    for text in (str(world.data_dir), str(world.running.ctx.config.spool_dir),
                 tempfile.gettempdir(), "/spool"):
        for message in world.messages:
            assert text not in message, message


def test_a_full_server_still_answers_health_checks(world: World, tmp_path: Path) -> None:
    """The whole call cap held by idle streams (the outage of issue 12): KeyService calls are
    refused RATE_LIMITED with a retry hint, health and reflection are still answered."""
    running = create_server(ServerConfig(data_dir=tmp_path / "ttp", listen="127.0.0.1:0",
                                         grace_seconds=0, max_concurrent_rpcs=4))
    release = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        tokens = {}
        for name, role in (("owner_a", "owner"), ("owner_b", "owner")):
            tokens[name] = new_token()
            running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
        stub = keyservice_pb2_grpc.KeyServiceStub(channel)
        first = [pb.RegisterRequest(header=world.headers["owner_a"])]
        holders = [stub.Register.future(_stalling(first, release), timeout=WAIT,
                                        metadata=[("authorization", f"Bearer {tokens['owner_a']}")])
                   for _ in range(4)]
        deadline = time.monotonic() + WAIT
        while running.calls.open_calls("owner_a") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.calls.open_calls("owner_a") == 4
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetPublicKey(pb.GetPublicKeyRequest(), timeout=30,
                              metadata=[("authorization", f"Bearer {tokens['owner_b']}")])
        r = world.refusal(caught.value)
        assert (r.code, r.reason) == (S.RESOURCE_EXHAUSTED, "RATE_LIMITED") and r.retry_after
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="freemark.v1.KeyService"), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        assert next(answers).list_services_response.service
        assert not any(h.done() for h in holders)
    finally:
        release.set()
        channel.close()
        running.stop(grace=0)
