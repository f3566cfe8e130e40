"""The key server against wrong callers and hostile uploads, over real gRPC on loopback.

Authorisation matrix: every RPC × {anonymous, wrong token, owner A, owner B, arbiter, admin}.
Hostile uploads: each refused with the right status, no side effect (no canary file, no log
entry) and the server still serving afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hostile_models
from freemark.derive import derive_key
from freemark.formats.pt2 import load_program
from freemark.scheme.bundle import load_bundle, save_bundle, to_proto
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models

S = grpc.StatusCode
UPLOAD_CAP = 2 * 1024 * 1024
CHUNK = 64 * 1024
CALLERS = ("anonymous", "wrong", "owner_a", "owner_b", "arbiter", "admin")


class World:
    """A running server, its principals' tokens, and owner A's registration."""

    def __init__(self, running: RunningServer, tokens: dict[str, str], files: ModelFiles,
                 key: Path) -> None:
        self.running = running
        self.tokens = tokens
        self.files = files
        self.key = key
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = keyservice_pb2_grpc.KeyServiceStub(self.channel)
        self.registration_id = ""

    def metadata(self, caller: str) -> list[tuple[str, str]]:
        if caller == "anonymous":
            return []
        token = "fmk_not-a-real-token" if caller == "wrong" else self.tokens[caller]
        return [("authorization", f"Bearer {token}")]

    def tree_size(self) -> int:
        return self.running.ctx.store.tree_size()


def _stream(header_field: str, header: object, data: bytes, *, cut: int | None = None
            ) -> Iterator[object]:
    message = pb.RegisterRequest if header_field == "register" else pb.VerifyRequest
    yield message(header=header)
    body = data if cut is None else data[:cut]
    for start in range(0, len(body), CHUNK):
        yield message(chunk=body[start:start + CHUNK])


def _upload(data: bytes, fmt: int = pb.MODEL_FORMAT_PT2, *, size: int | None = None,
            sha: bytes | None = None) -> pb.UploadHeader:
    return pb.UploadHeader(total_size=len(data) if size is None else size,
                           sha256=hashlib.sha256(data).digest() if sha is None else sha, format=fmt)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return S.OK


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("security")
    files = build_models(folder)
    # The matrix sends many Verify calls through one arbiter's token in a few seconds: its
    # subject is who may call what, not the rate limits (test_keyserver_streams.py has those).
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                          max_upload_bytes=UPLOAD_CAP, grace_seconds=5,
                          verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED,
                          register_rate_principal=UNLIMITED)
    running = create_server(config)
    tokens = {}
    for caller, role in (("owner_a", "owner"), ("owner_b", "owner"), ("arbiter", "arbiter"),
                         ("admin", "admin")):
        tokens[caller] = new_token()
        running.ctx.store.add_principal(Principal(caller, role, hash_token(tokens[caller]), 0))
    key = folder / "a.fmk"
    save_bundle(key, derive_key(load_program(files.host), layer="act", owner="owner_a",
                                triggers=load_triggers(files.triggers)))
    w = World(running, tokens, files, key)
    host = files.host.read_bytes()
    receipt = w.stub.Register(_stream("register", pb.RegisterHeader(
        bundle=to_proto(load_bundle(key)), upload=_upload(host)), host),
        metadata=w.metadata("owner_a"), timeout=300)
    w.registration_id = receipt.registration_id
    yield w
    w.channel.close()
    running.stop(grace=1)


def _verify_call(w: World, caller: str, model: Path, registration: str | None = None
                 ) -> Callable[[], object]:
    data = model.read_bytes()
    header = pb.VerifyHeader(registration_id=registration or w.registration_id, upload=_upload(data))
    return lambda: w.stub.Verify(_stream("verify", header, data), metadata=w.metadata(caller),
                                 timeout=300)


EXPECTED: dict[str, dict[str, grpc.StatusCode]] = {
    #                      anonymous          wrong              owner_a       owner_b             arbiter             admin
    "Register":          dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.ALREADY_EXISTS, S.PERMISSION_DENIED, S.PERMISSION_DENIED, S.PERMISSION_DENIED))),
    "Verify":            dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.NOT_FOUND, S.OK, S.OK))),
    "GetRegistration":   dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.NOT_FOUND, S.OK, S.OK))),
    "ListRegistrations": dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    "GetCheckpoint":     dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    "GetInclusionProof": dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    "GetConsistencyProof": dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    "GetPublicKey":      dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    "GetEntries":        dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.OK, S.OK, S.OK))),
    # a white-box registration: refused before any endpoint is contacted, after authorisation
    "VerifyEndpoint":    dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.INVALID_ARGUMENT, S.NOT_FOUND, S.INVALID_ARGUMENT, S.INVALID_ARGUMENT))),
    # run last: admin revokes, owner A's second revoke is a no-op
    "Revoke":            dict(zip(CALLERS, (S.UNAUTHENTICATED, S.UNAUTHENTICATED, S.OK, S.NOT_FOUND, S.PERMISSION_DENIED, S.OK))),
}


def _call(w: World, rpc: str, caller: str) -> Callable[[], object]:
    md = w.metadata(caller)
    rid = w.registration_id
    if rpc == "Register":
        host = w.files.host.read_bytes()
        header = pb.RegisterHeader(bundle=to_proto(load_bundle(w.key)), upload=_upload(host))
        return lambda: w.stub.Register(_stream("register", header, host), metadata=md, timeout=300)
    if rpc == "Verify":
        return _verify_call(w, caller, w.files.finetuned)
    simple: dict[str, Callable[[], object]] = {
        "GetRegistration": lambda: w.stub.GetRegistration(
            pb.GetRegistrationRequest(registration_id=rid), metadata=md),
        "ListRegistrations": lambda: w.stub.ListRegistrations(pb.ListRegistrationsRequest(), metadata=md),
        "GetCheckpoint": lambda: w.stub.GetCheckpoint(pb.GetCheckpointRequest(), metadata=md),
        "GetInclusionProof": lambda: w.stub.GetInclusionProof(
            pb.GetInclusionProofRequest(log_index=0), metadata=md),
        "GetConsistencyProof": lambda: w.stub.GetConsistencyProof(
            pb.GetConsistencyProofRequest(old_size=1), metadata=md),
        "GetPublicKey": lambda: w.stub.GetPublicKey(pb.GetPublicKeyRequest(), metadata=md),
        "GetEntries": lambda: w.stub.GetEntries(pb.GetEntriesRequest(start=0), metadata=md),
        "Revoke": lambda: w.stub.Revoke(pb.RevokeRequest(registration_id=rid), metadata=md),
        "VerifyEndpoint": lambda: w.stub.VerifyEndpoint(pb.VerifyEndpointRequest(
            registration_id=rid, endpoint="http://127.0.0.1:9", model_name="m"), metadata=md),
    }
    return simple[rpc]


def test_hostile_uploads_are_refused_without_side_effects(world: World, tmp_path: Path) -> None:
    host = world.files.host
    canary = tmp_path / "canary"
    secret = tmp_path / "server-secret.bin"
    secret.write_bytes(bytes(range(256)) * 64)
    cases: dict[str, tuple[bytes, pb.UploadHeader | None, int | None, grpc.StatusCode, str]] = {}
    for name, build in {
        "pickled weights": lambda p: hostile_models.pickled_weights(host, p, canary),
        "pickled sample inputs": lambda p: hostile_models.pickled_sample_inputs(host, p, canary),
        "AOTInductor entry": lambda p: hostile_models.with_native_code(host, p),
        "file-reading graph": lambda p: hostile_models.reading_file(host, p, secret, after="relu_2"),
        "random bytes": lambda p: hostile_models.random_bytes(p),
    }.items():
        data = build(tmp_path / f"{name.replace(' ', '_')}.pt2").read_bytes()
        cases[name] = (data, None, None, S.INVALID_ARGUMENT, "")
    for name, path, words in (  # refused at vetting / from the zip directory, naming why
        ("torch.cond graph", hostile_models.branching_on_inputs(tmp_path / "cond.pt2"),
         "data-dependent control flow"),
        ("deflated graph bomb", hostile_models.oversized_graph(host, tmp_path / "bomb.pt2", 150_000),
         "inflates more than 100:1"),
    ):
        cases[name] = (path.read_bytes(), None, None, S.INVALID_ARGUMENT, words)
    good = host.read_bytes()
    cases["truncated stream"] = (good, None, len(good) // 2, S.DATA_LOSS, "stream ended")
    cases["size mismatch"] = (good, _upload(good, size=len(good) + 10), None, S.DATA_LOSS, "")
    cases["wrong SHA-256"] = (good, _upload(good, sha=b"\x00" * 32), None, S.DATA_LOSS, "SHA-256")
    cases["over the cap"] = (good, _upload(good, size=UPLOAD_CAP + 1), None,
                             S.RESOURCE_EXHAUSTED, str(UPLOAD_CAP))

    before = world.tree_size()
    health = health_pb2_grpc.HealthStub(world.channel)
    for name, (data, header, cut, expected, words) in cases.items():
        verify = pb.VerifyHeader(registration_id=world.registration_id,
                                 upload=header or _upload(data))
        with pytest.raises(grpc.RpcError) as caught:
            world.stub.Verify(_stream("verify", verify, data, cut=cut),
                              metadata=world.metadata("arbiter"), timeout=300)
        assert caught.value.code() == expected, f"{name}: {caught.value.code()} {caught.value.details()}"
        assert words in (caught.value.details() or ""), name
        assert "Traceback" not in (caught.value.details() or "")
        assert not canary.exists(), f"{name}: the payload ran"
        assert world.tree_size() == before, f"{name}: logged something"
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert not list((world.running.ctx.config.spool_dir).glob("upload-*")), "spool files left behind"


def test_a_stolen_copy_cannot_be_registered_by_someone_else(world: World, tmp_path: Path) -> None:
    """Ambiguity attack: owner B derives his own key on A's fine-tuned model; A's earlier key
    still decodes from it, so the TTP refuses, naming neither A's registration nor a p-value
    (either would be an oracle for a thief steering his laundering)."""
    key_b = derive_key(load_program(world.files.finetuned), layer="act", owner="owner_b",
                       triggers=load_triggers(world.files.triggers))
    data = world.files.finetuned.read_bytes()
    header = pb.RegisterHeader(bundle=to_proto(key_b), upload=_upload(data))
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.Register(_stream("register", header, data), metadata=world.metadata("owner_b"),
                            timeout=300)
    assert caught.value.code() == S.ALREADY_EXISTS
    details = caught.value.details() or ""
    assert "already claims this model" in details
    assert world.registration_id not in details and "p=" not in details


def test_authorisation_matrix(world: World) -> None:
    failures = []
    for rpc, expectations in EXPECTED.items():
        for caller, expected in expectations.items():
            got = _code(_call(world, rpc, caller))
            if got != expected:
                failures.append(f"{rpc} as {caller}: expected {expected.name}, got {got.name}")
    assert not failures, failures
    listed = world.stub.ListRegistrations(pb.ListRegistrationsRequest(),
                                          metadata=world.metadata("owner_b"))
    assert list(listed.registrations) == [], "owner B sees owner A's records"
    with pytest.raises(grpc.RpcError) as caught:
        _verify_call(world, "arbiter", world.files.finetuned)()
    assert caught.value.code() == S.FAILED_PRECONDITION and "revoked" in caught.value.details()


def test_malformed_requests(world: World) -> None:
    md = world.metadata("owner_a")
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.Register(iter([pb.RegisterRequest(chunk=b"abc")]), metadata=md)
    assert caught.value.code() == S.INVALID_ARGUMENT and "header" in caught.value.details()
    bad_bundle = to_proto(load_bundle(world.key))
    bad_bundle.key.data = bad_bundle.key.data[:-4]
    host = world.files.host.read_bytes()
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.Register(_stream("register", pb.RegisterHeader(bundle=bad_bundle,
                                                                  upload=_upload(host)), host),
                            metadata=md)
    assert caught.value.code() == S.INVALID_ARGUMENT and "bundle" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="reg_nope"), metadata=md)
    assert caught.value.code() == S.NOT_FOUND
