"""Operating the key server: TLS and mTLS identities, listen policy, graceful SIGTERM, safetensors."""

from __future__ import annotations

import datetime
import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.torch import save_file

from freemark.derive import derive_key
from freemark.errors import UnauthenticatedError
from freemark.formats.pt2 import load_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import save_bundle
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.server import create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, ServerProcess, build_models, cli_env, json_out, run_cli


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        import ipaddress

        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(item: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_models(tmp_path_factory.mktemp("ops-models"))


def test_mtls_client_certificate_maps_to_its_principal(tmp_path: Path) -> None:
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("freemark test CA", ca_key, None, ca=True)
    paths = {}
    for name, item in (("ca.pem", ca), ("server.pem", _cert("localhost", server_key, (ca.subject, ca_key), server=True)),
                       ("server.key", server_key), ("client.key", client_key),
                       ("client.pem", _cert("carol", client_key, (ca.subject, ca_key)))):
        paths[name] = tmp_path / name
        paths[name].write_bytes(_pem(item))
    config = ServerConfig(data_dir=tmp_path / "ttp", listen="127.0.0.1:0",
                          tls_cert=paths["server.pem"], tls_key=paths["server.key"],
                          client_ca=paths["ca.pem"], grace_seconds=1)
    running = create_server(config)
    try:
        running.ctx.store.add_principal(Principal("carol", "arbiter", hash_token(new_token()), 0))
        with KeyServiceClient(f"localhost:{running.port}", token=None, tls=True,
                              root_certificates=paths["ca.pem"].read_bytes(),
                              client_cert=paths["client.pem"].read_bytes(),
                              client_key=paths["client.key"].read_bytes(), retries=0) as client:
            assert b"PUBLIC KEY" in client.public_key()
        # without a client certificate the TLS handshake itself is refused
        channel = grpc.secure_channel(f"localhost:{running.port}", grpc.ssl_channel_credentials(
            root_certificates=paths["ca.pem"].read_bytes()))
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)
        channel.close()
    finally:
        running.stop(grace=1)


def test_listen_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without TLS"):
        ServerConfig(data_dir=tmp_path, listen="0.0.0.0:50051").check_listen()
    ServerConfig(data_dir=tmp_path, listen="0.0.0.0:50051", insecure=True).check_listen()
    ServerConfig(data_dir=tmp_path, listen="[::1]:50051").check_listen()
    failed = run_cli("freemark_keyserver.cli", "serve", "--data-dir", str(tmp_path / "d"),
                     "--listen", "0.0.0.0:0", check=False)
    assert failed.returncode == 2 and "without TLS" in failed.stderr


def test_sigterm_lets_an_inflight_verify_finish(files: ModelFiles, tmp_path: Path) -> None:
    """The Verify's upload is held half-sent until after SIGTERM, so its verdict can only
    come from a server that is draining: in flight at the signal, finished within the grace."""
    data_dir = tmp_path / "ttp"
    server = ServerProcess(data_dir).start()
    token = str(json_out(run_cli("freemark_keyserver.cli", "principal", "add", "--data-dir",
                                 str(data_dir), "--name", "alice", "--role", "owner", "--json"))["token"])
    key = tmp_path / "alice.fmk"
    save_bundle(key, derive_key(load_program(files.host), layer="act", owner="alice",
                                triggers=load_triggers(files.triggers)))
    env = cli_env(FREEMARK_SERVER=server.address, FREEMARK_TOKEN=token)
    receipt = json_out(run_cli("freemark.cli", "register", "--key", str(key), "--model",
                               str(files.host), "--json", env=env))
    suspect = files.finetuned.read_bytes()
    header = pb.VerifyHeader(registration_id=str(receipt["registration_id"]),
                             upload=pb.UploadHeader(total_size=len(suspect),
                                                    sha256=hashlib.sha256(suspect).digest(),
                                                    format=pb.MODEL_FORMAT_PT2))
    half_sent, signalled = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def requests() -> Iterator[pb.VerifyRequest]:
        yield pb.VerifyRequest(header=header)
        yield pb.VerifyRequest(chunk=suspect[:len(suspect) // 2])
        half_sent.set()
        signalled.wait(60)
        yield pb.VerifyRequest(chunk=suspect[len(suspect) // 2:])

    def verify() -> None:
        with grpc.insecure_channel(server.address) as channel:
            outcome["verdict"] = keyservice_pb2_grpc.KeyServiceStub(channel).Verify(
                requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=120)

    worker = threading.Thread(target=verify)
    worker.start()
    assert half_sent.wait(60)
    time.sleep(0.5)  # the half upload reaches the server: the call is in flight
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the server is stopping, the call still open
    signalled.set()
    worker.join(timeout=120)
    assert server.process.wait(timeout=60) == 0
    verdict = outcome.get("verdict")
    assert isinstance(verdict, pb.SignedVerdict) and verdict.is_match is True


def test_safetensors_suspect_uses_the_registered_architecture(files: ModelFiles, tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path / "ttp", listen="127.0.0.1:0", grace_seconds=1)
    running = create_server(config)
    try:
        tokens = {"alice": new_token(), "judge": new_token()}
        running.ctx.store.add_principal(Principal("alice", "owner", hash_token(tokens["alice"]), 0))
        running.ctx.store.add_principal(Principal("judge", "arbiter", hash_token(tokens["judge"]), 0))
        bundle = derive_key(load_program(files.host), layer="act", owner="alice",
                            triggers=load_triggers(files.triggers))
        key = tmp_path / "a.fmk"
        save_bundle(key, bundle)
        address = f"127.0.0.1:{running.port}"
        with KeyServiceClient(address, token=tokens["alice"]) as alice:
            receipt = alice.register(bundle, files.host)
        weights = tmp_path / "stolen.safetensors"
        program = load_program(files.finetuned)
        save_file({k: v.contiguous() for k, v in program.state_dict.items()}, str(weights))
        with KeyServiceClient(address, token=tokens["judge"]) as judge:
            verdict = judge.verify(receipt.registration_id, weights)
        assert verdict.is_match
        with KeyServiceClient(address, token="fmk_wrong", retries=0) as anonymous, \
                pytest.raises(UnauthenticatedError):
            anonymous.public_key()
    finally:
        running.stop(grace=1)


def test_master_key_rotation_keeps_every_record_readable(files: ModelFiles, tmp_path: Path) -> None:
    data_dir = tmp_path / "ttp"
    config = ServerConfig(data_dir=data_dir, listen="127.0.0.1:0", grace_seconds=1)
    running = create_server(config)
    token = new_token()
    running.ctx.store.add_principal(Principal("alice", "owner", hash_token(token), 0))
    bundle = derive_key(load_program(files.host), layer="act", owner="alice",
                        triggers=load_triggers(files.triggers))
    with KeyServiceClient(f"127.0.0.1:{running.port}", token=token) as alice:
        receipt = alice.register(bundle, files.host)
    envelope_before = running.ctx.store.get_registration(receipt.registration_id)
    running.stop(grace=1)

    rotated = json_out(run_cli("freemark_keyserver.cli", "rotate-master-key", "--data-dir",
                               str(data_dir), "--json"))
    # The registration's key and host, and the claim signature the index keeps beside it.
    assert rotated["key_version"] == 2
    assert rotated["rewrapped"] == {"registrations": 1, "claim_signatures": 1, "panel_members": 0}

    running = create_server(config)
    try:
        record = running.ctx.store.get_registration(receipt.registration_id)
        assert record is not None and envelope_before is not None
        assert record.key_version == 2 and record.envelope != envelope_before.envelope
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=token) as alice:
            assert alice.verify(receipt.registration_id, files.finetuned).is_match
    finally:
        running.stop(grace=1)
    audit = json_out(run_cli("freemark_keyserver.cli", "audit", "--data-dir", str(data_dir), "--json"))
    assert audit["ok"] is True
