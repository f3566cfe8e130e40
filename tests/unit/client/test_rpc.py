"""The client's transport against a real gRPC server on loopback (a stand-in, not ours).

The stand-in registers generic handlers for two KeyService methods and fails on cue, so the
retry policy, the error conversion, deadlines and streamed uploads are tested over a real
HTTP/2 connection rather than a mocked stub.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from freemark.cli import main
from freemark.errors import (
    DeadlineExceededError,
    InvalidInputError,
    PermissionDeniedError,
    ServerError,
    TransportError,
)
from freemark.records.types import RegistrationInfo
from freemark.records.wire import registration_to_proto, verdict_to_proto
from freemark.rpc import KeyServiceClient, is_loopback
from freemark.v1 import keyservice_pb2 as pb
from signed_statements import ORIGIN, standard_log

LOG = standard_log()
PEM = LOG.signer.public_key_pem()
REGISTRATIONS = [
    RegistrationInfo(f"reg-{i}", "alice", 1_700_000_000_000_000 + i, bytes([i]) * 32,
                     bytes([i + 1]) * 32, "act", 256, i, None)
    for i in range(5)
]


@dataclass
class StandIn:
    """What the stand-in server will answer, and what it saw."""

    port: int
    failures: deque[grpc.StatusCode] = field(default_factory=deque)
    delay_s: float = 0.0
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    uploads: list[tuple[pb.VerifyHeader, list[pb.VerifyRequest]]] = field(default_factory=list)

    def _answer(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        time.sleep(self.delay_s)
        if self.failures:
            context.abort(self.failures.popleft(), "scripted failure")

    def get_public_key(self, request: pb.GetPublicKeyRequest,
                       context: grpc.ServicerContext) -> pb.PublicKey:
        self._answer(context)
        return pb.PublicKey(pem=PEM, key_id=LOG.signer.key_id, origin=ORIGIN)

    def list_registrations(self, request: pb.ListRegistrationsRequest,
                           context: grpc.ServicerContext) -> pb.ListRegistrationsResponse:
        self._answer(context)
        start = int(request.page_token or 0)
        end = start + request.page_size
        return pb.ListRegistrationsResponse(
            registrations=[registration_to_proto(info) for info in REGISTRATIONS[start:end]],
            next_page_token=str(end) if end < len(REGISTRATIONS) else "",
        )

    def verify(self, requests: Iterator[pb.VerifyRequest],
               context: grpc.ServicerContext) -> pb.SignedVerdict:
        header = next(requests).header
        self.uploads.append((header, list(requests)))
        self._answer(context)
        return verdict_to_proto(LOG.verdict(3))


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    state = StandIn(port)
    handlers: dict[str, Any] = {
        "GetPublicKey": grpc.unary_unary_rpc_method_handler(
            state.get_public_key,
            request_deserializer=pb.GetPublicKeyRequest.FromString,
            response_serializer=pb.PublicKey.SerializeToString,
        ),
        "ListRegistrations": grpc.unary_unary_rpc_method_handler(
            state.list_registrations,
            request_deserializer=pb.ListRegistrationsRequest.FromString,
            response_serializer=pb.ListRegistrationsResponse.SerializeToString,
        ),
        "Verify": grpc.stream_unary_rpc_method_handler(
            state.verify,
            request_deserializer=pb.VerifyRequest.FromString,
            response_serializer=pb.SignedVerdict.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("freemark.v1.KeyService", handlers),)
    )
    server.start()
    yield state
    server.stop(None)


def _client(port: int, **options: Any) -> KeyServiceClient:
    return KeyServiceClient(f"127.0.0.1:{port}", token="t0ken", backoff=0.01, **options)


def test_unavailable_is_retried_until_the_call_succeeds(stand_in: StandIn) -> None:
    stand_in.failures.extend([grpc.StatusCode.UNAVAILABLE] * 2)
    with _client(stand_in.port, retries=3) as client:
        assert client.public_key() == PEM
    assert stand_in.calls == 3
    assert all(seen["authorization"] == "Bearer t0ken" for seen in stand_in.metadata)


def test_permission_denied_is_not_retried_and_keeps_code_and_message(stand_in: StandIn) -> None:
    stand_in.failures.append(grpc.StatusCode.PERMISSION_DENIED)
    with _client(stand_in.port) as client, pytest.raises(PermissionDeniedError) as caught:
        client.public_key()
    assert stand_in.calls == 1
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == "scripted failure"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_an_unmapped_status_is_a_plain_server_error(stand_in: StandIn) -> None:
    stand_in.failures.append(grpc.StatusCode.DATA_LOSS)
    with _client(stand_in.port) as client, pytest.raises(ServerError) as caught:
        client.public_key()
    assert type(caught.value) is ServerError
    assert caught.value.code == grpc.StatusCode.DATA_LOSS


def test_unavailable_after_every_retry_is_a_transport_error(stand_in: StandIn) -> None:
    stand_in.failures.extend([grpc.StatusCode.UNAVAILABLE] * 5)
    with _client(stand_in.port, retries=2) as client, pytest.raises(TransportError):
        client.public_key()
    assert stand_in.calls == 3


def test_a_slow_answer_hits_the_deadline_and_is_not_retried(stand_in: StandIn) -> None:
    stand_in.delay_s = 1.0
    with _client(stand_in.port, timeout=0.2) as client, pytest.raises(DeadlineExceededError):
        client.public_key()
    assert stand_in.calls == 1


def test_nothing_listening_is_a_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with _client(port, retries=1) as client, pytest.raises(TransportError, match=str(port)):
        client.public_key()


def test_an_upload_is_chunked_and_re_sent_from_the_start_on_retry(
    stand_in: StandIn, tmp_path: Path
) -> None:
    model = tmp_path / "suspect.safetensors"
    model.write_bytes(bytes(range(256)) * 20)  # 5120 bytes
    stand_in.failures.append(grpc.StatusCode.UNAVAILABLE)
    with _client(stand_in.port, chunk_size=1000) as client:
        verdict = client.verify("reg-0000", model, alpha=1e-6)
    assert verdict == LOG.verdict(3)
    assert len(stand_in.uploads) == 2
    for header, parts in stand_in.uploads:
        assert header.registration_id == "reg-0000" and header.alpha == 1e-6
        assert header.upload.format == pb.MODEL_FORMAT_SAFETENSORS
        assert header.upload.total_size == 5120
        # Hashed while sent (read once): the header defers the SHA-256 to the last part.
        assert header.upload.sha256 == b""
        assert [part.WhichOneof("part") for part in parts] == ["chunk"] * 6 + ["sha256"]
        assert parts[-1].sha256 == hashlib.sha256(model.read_bytes()).digest()
        chunks = [part.chunk for part in parts[:-1]]
        assert [len(chunk) for chunk in chunks] == [1000] * 5 + [120]
        assert b"".join(chunks) == model.read_bytes()


def test_an_unknown_model_suffix_is_refused_before_any_call(tmp_path: Path) -> None:
    model = tmp_path / "suspect.bin"
    model.write_bytes(b"x")
    with _client(1) as client, pytest.raises(InvalidInputError, match="suffix"):
        client.verify("reg-0000", model)


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("10.0.0.1:50051", False),
        ("ttp.example.com:443", False),
        ("localhost.example.com:443", False),
    ],
)
def test_is_loopback(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_list_registrations_follows_page_tokens(stand_in: StandIn) -> None:
    with _client(stand_in.port) as client:
        assert list(client.list_registrations(page_size=2)) == REGISTRATIONS
    assert stand_in.calls == 3


# --- the CLI on the client ---------------------------------------------------------------------


def _cli(stand_in: StandIn, *argv: str) -> int:
    return main([*argv, "--server", f"127.0.0.1:{stand_in.port}", "--token", "t0ken"])


def test_cli_verify_json_is_one_object_that_verifies_offline(
    stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "suspect.safetensors"
    weights.write_bytes(b"weights")
    assert _cli(stand_in, "verify", "--registration", "reg-0000", "--weights", str(weights),
                "--json") == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    data = json.loads(out)
    for key in ("registration_id", "n_bits", "matches", "ber", "p_value", "p_value_binomial",
                "alpha", "is_match", "log_index", "signature"):
        assert key in data
    assert stand_in.uploads[0][0].upload.format == pb.MODEL_FORMAT_SAFETENSORS
    (tmp_path / "verdict.json").write_text(out)
    (tmp_path / "ttp.pem").write_bytes(PEM)
    assert main(["receipt", "verify", str(tmp_path / "verdict.json"),
                 "--public-key", str(tmp_path / "ttp.pem")]) == 0
    assert capsys.readouterr().out.startswith("OK verdict for reg-0000")


def test_cli_registrations_list_json(
    stand_in: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(stand_in, "registrations", "list", "--page-size", "3", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["registration_id"] for r in data["registrations"]] == [
        info.registration_id for info in REGISTRATIONS
    ]


def test_cli_public_key_out(
    stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(stand_in, "public-key", "--out", str(tmp_path / "ttp.pem")) == 0
    assert (tmp_path / "ttp.pem").read_bytes() == PEM
    out = capsys.readouterr().out
    assert LOG.signer.key_id in out and ORIGIN in out


def test_cli_server_error_is_one_line_and_exit_2(
    stand_in: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_in.failures.append(grpc.StatusCode.PERMISSION_DENIED)
    assert _cli(stand_in, "public-key") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "freemark: error: scripted failure [PERMISSION_DENIED]"
    ]


_MAPPED_CHUNKS = """
import ctypes
from freemark.rpc import DEFAULT_CHUNK_SIZE, recycle_chunk_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped(size):  # bytes of separately mapped blocks a buffer of `size` adds
    before = libc.mallinfo2().hblkhd
    buffer = bytearray(size)
    return libc.mallinfo2().hblkhd - before

print(mapped(DEFAULT_CHUNK_SIZE), recycle_chunk_memory(), mapped(DEFAULT_CHUNK_SIZE))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_upload_chunks_come_from_the_heap_once_recycled() -> None:
    """Issue 20: a chunk-sized buffer is its own mmap by default (page faults and zeroing at
    every copy of every chunk); after `recycle_chunk_memory` it comes from the reused heap.
    In a fresh interpreter: the setting is process-wide."""
    out = subprocess.run([sys.executable, "-c", _MAPPED_CHUNKS], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    before, recycled, after = out.stdout.split()
    assert int(before) >= (1 << 20) and recycled == "True" and int(after) == 0
