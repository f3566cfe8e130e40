"""No upload rests on disk in the clear, whatever the spool's memory budget, over
real key servers on loopback with their real sandboxes, stores and cryptography.

Two servers judge the same digits models: `disk` sends every upload to the disk spool
(`spool_memory_bytes=0`, as any upload past the budget or arriving while others hold it is
sent), `memory` keeps every upload in memory (the default budget). The markers are 32-byte
runs of each model's weights (the largest entry of its .pt2 archive, stored uncompressed):
were any part of an upload written to disk in the clear, the file holding it would contain
them. While a Register's upload is halfway in, and after Register and Verify complete, no file
under the disk server's data dir (the spool, the SQLite store with its host blobs and WAL, the
keys) holds a marker; the receipt and the verdicts are those the in-memory server gives for
the same bytes. A spool file changed, cut or extended on the server's disk before it is read
back is refused UPLOAD_CORRUPT (DATA_LOSS), naming no path, and nothing is logged. Checks are
on files, statuses and signed fields, never on how fast anything is.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from freemark.derive import derive_key
from freemark.formats.pt2 import load_program
from freemark.records.schema import to_json_fields
from freemark.records.types import SignedVerdict
from freemark.records.wire import receipt_from_proto
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import to_proto
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.rpc.uploads import SPOOL_SEGMENT_BYTES
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models

S = grpc.StatusCode
CHUNK = 8 * 1024  # small chunks, so a half-sent upload has many segments on disk
WAIT = 120.0  # a generous bound on waiting for the server; nothing is timed
# Fields of a receipt or verdict that name the call rather than the judgement.
PER_CALL = {"registration_id", "log_index", "integrated_time"}


@dataclass
class Pair:
    disk: RunningServer
    memory: RunningServer
    files: ModelFiles
    token: str
    bundle: Any
    receipts: dict[str, dict[str, Any]]  # the judged fields of each server's receipt
    registrations: dict[str, str]
    halfway: list[str]  # files under the disk server's data dir holding a marker, halfway in
    halfway_mode: int  # the spool file's permission bits then

    def client(self, running: RunningServer) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{running.port}", token=self.token, timeout=300)

    def stub(self, running: RunningServer) -> tuple[grpc.Channel,
                                                    keyservice_pb2_grpc.KeyServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        return channel, keyservice_pb2_grpc.KeyServiceStub(channel)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


def _server(data_dir: Path, **options: Any) -> RunningServer:
    return create_server(ServerConfig(
        data_dir=data_dir, listen="127.0.0.1:0", grace_seconds=1,
        verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED, **options))


def _upload(data: bytes) -> pb.UploadHeader:
    return pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                           format=pb.MODEL_FORMAT_PT2)


def _weight_markers(path: Path) -> list[bytes]:
    """32-byte runs spread over the model's weights (its archive's largest entry), each of
    at least 20 distinct bytes: found nowhere but in a copy of these bytes."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
        assert largest.compress_type == zipfile.ZIP_STORED
        weights = archive.read(largest)
    start = data.index(weights)
    runs = [data[at:at + 32] for at in range(start, start + len(weights) - 32, len(weights) // 40)]
    markers = [run for run in runs if len(set(run)) >= 20]
    assert len(markers) >= 20, "the weights must give markers"
    return markers


def _in_the_clear(data_dir: Path, markers: list[bytes]) -> list[str]:
    """Every file under `data_dir` (walked whole) that holds any of `markers`."""
    found = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            if any(marker in content for marker in markers):
                found.append(str(path.relative_to(data_dir)))
    return found


def _paused(first: list[object], rest: list[object], halfway: threading.Event,
            go: threading.Event) -> Iterator[object]:
    """Send `first`, say so, wait for `go`, send `rest`: an upload caught halfway in."""
    yield from first
    halfway.set()
    go.wait(WAIT)
    yield from rest


def _spool_file(running: RunningServer, at_least: int) -> Path:
    """The one spool file, once it holds `at_least` bytes."""
    spool = running.ctx.config.spool_dir
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        files = list(spool.iterdir())
        if len(files) == 1 and files[0].stat().st_size >= at_least:
            return files[0]
        time.sleep(0.02)
    raise AssertionError(f"no spool file of {at_least} bytes: {list(spool.iterdir())}")


def _written(sent: int) -> int:
    """Bytes of the spool file once `sent` bytes of an upload are in: whole segments only
    (the rest waits in memory for its segment to fill), each with its 16-byte tag."""
    return sent // SPOOL_SEGMENT_BYTES * (SPOOL_SEGMENT_BYTES + 16)


def _register_caught_halfway(pair: Pair, markers: list[bytes]) -> None:
    """Register the host on the disk server, halting the upload halfway in to look at every
    file under the data dir and the spool file's mode."""
    data = pair.files.host.read_bytes()
    header = pb.RegisterRequest(header=pb.RegisterHeader(bundle=to_proto(pair.bundle),
                                                         upload=_upload(data)))
    chunks = [pb.RegisterRequest(chunk=data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
    first, rest = chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]
    halfway, go = threading.Event(), threading.Event()
    channel, stub = pair.stub(pair.disk)
    try:
        call = stub.Register.future(_paused([header, *first], rest, halfway, go),
                                    metadata=pair.metadata(), timeout=300)
        try:
            assert halfway.wait(WAIT)
            sent = len(first) * CHUNK
            assert _written(sent) > len(data) // 4  # a good part of the weights is on disk
            spooled = _spool_file(pair.disk, _written(sent))
            pair.halfway = _in_the_clear(pair.disk.ctx.config.data_dir, markers)
            pair.halfway_mode = spooled.stat().st_mode & 0o777
        finally:
            go.set()
        receipt = receipt_from_proto(call.result(timeout=300))
    finally:
        channel.close()
    pair.registrations["disk"] = receipt.registration_id
    pair.receipts["disk"] = to_json_fields(receipt)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("encrypted-spool")
    files = build_models(folder)
    disk = _server(folder / "disk", spool_memory_bytes=0)
    memory = _server(folder / "memory")
    token = new_token()
    for running in (disk, memory):
        running.ctx.store.add_principal(Principal("alice", "owner", hash_token(token), 0))
    bundle = derive_key(load_program(files.host), layer="act", owner="alice",
                        triggers=load_triggers(files.triggers))
    pair = Pair(disk, memory, files, token, bundle, {}, {}, [], 0)
    try:
        with pair.client(memory) as alice:
            receipt = alice.register(bundle, files.host)
        pair.registrations["memory"] = receipt.registration_id
        pair.receipts["memory"] = to_json_fields(receipt)
        _register_caught_halfway(pair, _weight_markers(files.host))
        yield pair
    finally:
        disk.stop(grace=1)
        memory.stop(grace=1)


def test_a_host_halfway_in_and_registered_is_nowhere_on_disk_in_the_clear(pair: Pair) -> None:
    """Register through the disk spool, caught halfway: the spool file (0600) holds
    ciphertext only, as does every other file under the data dir, then and once the host is
    registered (its blobs in the store sealed); the receipt is the one the in-memory server
    signed for the same host and key."""
    assert pair.halfway == [] and pair.halfway_mode == 0o600
    assert list(pair.disk.ctx.config.spool_dir.iterdir()) == []
    assert _in_the_clear(pair.disk.ctx.config.data_dir, _weight_markers(pair.files.host)) == []
    judged = [{k: v for k, v in pair.receipts[name].items() if k not in PER_CALL}
              for name in ("disk", "memory")]
    assert judged[0] == judged[1]
    # The walk finds the markers where they are in the clear: the model file the owner sent.
    assert "host.pt2" in _in_the_clear(pair.files.host.parent, _weight_markers(pair.files.host))


@pytest.mark.parametrize("suspect", ["finetuned", "independent"])
def test_a_verify_through_the_disk_spool_is_the_in_memory_verdict(pair: Pair,
                                                                 suspect: str) -> None:
    """The same suspect verified on both servers: every judged field of the signed verdict
    (decision, statistics, the suspect's SHA-256 and size) is the same; nothing of the
    suspect stays under the disk server's data dir."""
    path: Path = getattr(pair.files, suspect)
    verdicts = {}
    for name, running in (("disk", pair.disk), ("memory", pair.memory)):
        with pair.client(running) as alice:
            verdict = alice.verify(pair.registrations[name], path)
        assert isinstance(verdict, SignedVerdict)
        verdicts[name] = {k: v for k, v in to_json_fields(verdict).items() if k not in PER_CALL}
    assert verdicts["disk"] == verdicts["memory"]
    assert verdicts["disk"]["outcome"] == ("match" if suspect == "finetuned" else "no_match")
    assert verdicts["disk"]["suspect_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(pair.disk.ctx.config.spool_dir.iterdir()) == []
    assert _in_the_clear(pair.disk.ctx.config.data_dir, _weight_markers(path)) == []


def _flip(spooled: Path) -> None:
    with spooled.open("r+b") as handle:
        byte = handle.read(1)
        handle.seek(0)
        handle.write(bytes([byte[0] ^ 0x80]))


def _cut(spooled: Path) -> None:
    os.truncate(spooled, spooled.stat().st_size // 2)


def _extend(spooled: Path) -> None:
    with spooled.open("ab") as handle:
        handle.write(os.urandom(SPOOL_SEGMENT_BYTES + 16))


@pytest.mark.parametrize("damage", [_flip, _cut, _extend], ids=["flipped", "cut", "extended"])
def test_a_spool_file_damaged_on_disk_is_refused_and_nothing_logged(
        pair: Pair, damage: Callable[[Path], None]) -> None:
    """A Verify's spool file is changed on the server's disk while the upload streams (a
    byte flipped, the file cut, bytes appended after the last segment): the upload arrives
    intact and checks out, but its spooled copy does not authenticate when read back, so it
    is refused UPLOAD_CORRUPT before the sandbox sees a byte; the message names no path,
    nothing is appended to the log, and the spool is left empty."""
    data = pair.files.finetuned.read_bytes()
    header = pb.VerifyRequest(header=pb.VerifyHeader(registration_id=pair.registrations["disk"],
                                                     upload=_upload(data)))
    chunks = [pb.VerifyRequest(chunk=data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
    # Appending must come after the last write (the whole upload in, before its end is
    # checked); flipping or cutting halfway lets the rest be written after the damage.
    cut = len(chunks) if damage is _extend else len(chunks) // 2
    first, rest = chunks[:cut], chunks[cut:]
    before = pair.disk.ctx.store.tree_size()
    halfway, go = threading.Event(), threading.Event()
    channel, stub = pair.stub(pair.disk)
    try:
        call = stub.Verify.future(_paused([header, *first], rest, halfway, go),
                                  metadata=pair.metadata(), timeout=300)
        try:
            assert halfway.wait(WAIT)
            sent = min(len(first) * CHUNK, len(data))
            written = _written(sent) if sent < len(data) else \
                len(data) + 16 * -(-len(data) // SPOOL_SEGMENT_BYTES)
            damage(_spool_file(pair.disk, written))
        finally:
            go.set()
        with pytest.raises(grpc.RpcError) as caught:
            call.result(timeout=300)
    finally:
        channel.close()
    error = caught.value
    assert error.code() == S.DATA_LOSS, (error.code(), error.details())
    message = error.details() or ""
    assert "re-send" in message
    assert str(pair.disk.ctx.config.data_dir) not in message and "/spool" not in message
    assert pair.disk.ctx.store.tree_size() == before
    assert list(pair.disk.ctx.config.spool_dir.iterdir()) == []
