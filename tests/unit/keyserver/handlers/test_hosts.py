"""Registered hosts at rest: sealed in segments, opened for the sandbox, re-wrapped on rotation.

A real SQLite store and real cryptography; the store contract suite covers PostgreSQL's side
of the blob table. Memory is measured with tracemalloc: sealing and storing, then opening, a
model many segments long must never allocate anything near its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from freemark.records import wire
from freemark.records.types import NO_PANEL, RECEIPT_KIND, Receipt
from freemark.tlog import merkle
from freemark_keyserver import cli
from freemark_keyserver.config import MASTER_KEY_ENV
from freemark_keyserver.crypto import (
    SEGMENT_BYTES,
    CryptoError,
    MasterKeyring,
    SigningKey,
    keyring_from_file,
    load_or_create_keyring,
    seal,
)
from freemark_keyserver.handlers.hosts import host_file, rewrap_host, store_host
from freemark_keyserver.store import Registration, Store, open_store
from freemark_keyserver.tlog.audit import audit

OWNER = "alice"
SIGNER = SigningKey.generate()  # the TTP's: it signs every log entry, and the audit checks it


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ttp"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def keyring(data_dir: Path) -> MasterKeyring:
    return load_or_create_keyring(data_dir / "master.key")


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = open_store(str(data_dir / "freemark.sqlite3"))
    yield s
    s.close()


def model_file(folder: Path, size: int) -> Path:
    path = folder / f"model-{size}.pt2"
    with path.open("wb") as out:
        for start in range(0, size, SEGMENT_BYTES):
            out.write(os.urandom(min(SEGMENT_BYTES, size - start)))
    return path


def registered(
    store: Store, keyring: MasterKeyring, registration_id: str, host_envelope: bytes
) -> Registration:
    """Append a registration the way the handler does, with a receipt-shaped log entry."""
    fingerprint = hashlib.sha256(b"host-" + registration_id.encode()).digest()
    commitment = hashlib.sha256(registration_id.encode()).digest()

    def build(index: int, now: int) -> bytes:
        return wire.encode_body(Receipt, {
            "registration_id": registration_id, "owner": OWNER, "host_fingerprint": fingerprint,
            "watermark_commitment": commitment, "layer": "act", "n_bits": 16,
            "architecture_digest": b"\x02" * 32, "panel": NO_PANEL, "log_index": index,
            "integrated_time": now, "panel_members": (), "panel_warning": "", "query_sets": (),
        })

    bundle = seal(keyring, b"bundle", record_id=registration_id, owner=OWNER).to_bytes()
    record = Registration(registration_id, OWNER, 0, fingerprint, b"\x02" * 32, "act", 8, 16,
                          commitment, 1, bundle, host_envelope, -1)
    entry = store.append(RECEIPT_KIND, build, record,
                         sign=lambda body: (SIGNER.key_id, SIGNER.sign(body)))
    return replace(record, log_index=entry.index, created_at=entry.created_at)


def test_a_host_round_trips_through_segments(
    store: Store, keyring: MasterKeyring, tmp_path: Path, data_dir: Path
) -> None:
    host = model_file(tmp_path, 3 * SEGMENT_BYTES + 123)
    header = store_host(store, keyring, host, registration_id="reg_1", owner=OWNER)
    assert store.host_blob_segments("reg_1") == 4
    # At rest beside the database, ciphertext only: no run of the model's bytes is in it.
    (blob,) = (data_dir / "freemark.sqlite3-blobs").iterdir()
    plaintext, sealed = host.read_bytes(), blob.read_bytes()
    assert len(sealed) > len(plaintext)
    assert not any(plaintext[i:i + 32] in sealed for i in range(0, len(plaintext), 65_536))
    record = registered(store, keyring, "reg_1", header)
    with host_file(store, keyring, record) as opened:
        assert opened.read_bytes() == host.read_bytes()
        target = os.readlink(opened)  # a memfd: memory only, no directory entry anywhere
        assert target.startswith("/memfd:freemark-host")
        with pytest.raises(PermissionError):  # sealed: nobody, the sandbox included, changes it
            opened.write_bytes(b"tampered")
    assert not opened.exists()


def test_sealing_and_opening_never_hold_the_model(
    store: Store, keyring: MasterKeyring, tmp_path: Path
) -> None:
    host = model_file(tmp_path, 24 * SEGMENT_BYTES)
    tracemalloc.start()
    try:
        header = store_host(store, keyring, host, registration_id="reg_1", owner=OWNER)
        _, sealing_peak = tracemalloc.get_traced_memory()
        record = registered(store, keyring, "reg_1", header)
        tracemalloc.reset_peak()
        with host_file(store, keyring, record) as opened:
            _, opening_peak = tracemalloc.get_traced_memory()
            assert opened.stat().st_size == host.stat().st_size
    finally:
        tracemalloc.stop()
    # A few segments in flight at most (plaintext, ciphertext, the driver's copy): never 24.
    assert sealing_peak < 4 * SEGMENT_BYTES
    assert opening_peak < 4 * SEGMENT_BYTES


def test_a_missing_segment_is_refused_and_the_audit_names_it(
    store: Store, keyring: MasterKeyring, tmp_path: Path, data_dir: Path
) -> None:
    host = model_file(tmp_path, 2 * SEGMENT_BYTES + 1)
    header = store_host(store, keyring, host, registration_id="reg_1", owner=OWNER)
    record = registered(store, keyring, "reg_1", header)
    verifier = SIGNER.verifier()  # the log has no checkpoints to sign
    assert audit(store, verifier)["registrations"] == 1
    # The SQLite store keeps the blob as a file beside the database: drop its last segment
    # (one byte of plaintext, its 16-byte tag, its 4-byte length).
    blob = data_dir / "freemark.sqlite3-blobs" / (b"reg_1".hex() + ".blob")
    os.truncate(blob, blob.stat().st_size - (4 + 1 + 16))
    with pytest.raises(CryptoError), host_file(store, keyring, record):
        pytest.fail("a truncated host was handed out")
    assert list(tmp_path.glob("tmp*")) == []  # nothing decrypted is left behind
    with pytest.raises(merkle.LogProofError, match="2 of its 3 host segments"):
        audit(store, verifier)


def test_a_host_sealed_whole_before_v3_still_opens_and_rotates(
    store: Store, keyring: MasterKeyring, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    envelope = seal(keyring, data, record_id="reg_0/host", owner=OWNER).to_bytes()
    record = registered(store, keyring, "reg_0", envelope)
    with host_file(store, keyring, record) as opened:
        assert opened.read_bytes() == data
    rotated = keyring.generate_new_version()
    moved = replace(record, host_envelope=rewrap_host(rotated, record))
    with host_file(store, MasterKeyring({2: rotated._key(2)}), moved) as opened:
        assert opened.read_bytes() == data
    assert audit(store, SIGNER.verifier())["registrations"] == 1


def test_rotate_master_key_rewraps_host_headers_and_leaves_segments(
    store: Store, keyring: MasterKeyring, tmp_path: Path, data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = model_file(tmp_path, SEGMENT_BYTES + 5)
    header = store_host(store, keyring, host, registration_id="reg_1", owner=OWNER)
    registered(store, keyring, "reg_1", header)
    segments = list(store.host_blob("reg_1"))

    assert cli.main(["rotate-master-key", "--data-dir", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rewrapped"]["registrations"] == 1

    record = store.get_registration("reg_1")
    assert record is not None and record.key_version == 2
    assert list(store.host_blob("reg_1")) == segments
    newest = keyring_from_file(data_dir / "master.key")
    with host_file(store, MasterKeyring({2: newest._key(2)}), record) as opened:
        assert opened.read_bytes() == host.read_bytes()


def test_rotation_saves_the_new_keyring_before_rewrapping_anything(
    store: Store, keyring: MasterKeyring, tmp_path: Path, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = model_file(tmp_path, 10)
    for name in ("reg_1", "reg_2"):
        registered(store, keyring, name,
                   store_host(store, keyring, host, registration_id=name, owner=OWNER))
    calls = []

    def dies_on_the_second(ring: MasterKeyring, record: Registration) -> bytes:
        calls.append(record.registration_id)
        if len(calls) == 2:
            raise RuntimeError("killed part-way")
        return rewrap_host(ring, record)

    monkeypatch.setattr(cli, "rewrap_host", dies_on_the_second)
    with pytest.raises(RuntimeError):
        cli.main(["rotate-master-key", "--data-dir", str(data_dir)])
    saved = keyring_from_file(data_dir / "master.key")
    assert saved.versions == (1, 2)
    for name in ("reg_1", "reg_2"):  # one under version 2, one still under 1: both open
        record = store.get_registration(name)
        assert record is not None
        with host_file(store, saved, record) as opened:
            assert opened.read_bytes() == host.read_bytes()


def test_rotation_refuses_a_keyring_from_the_environment(
    store: Store, keyring: MasterKeyring, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, (data_dir / "master.key").read_text().strip())
    assert cli.main(["rotate-master-key", "--data-dir", str(data_dir)]) == 2
    assert "--master-key-file" in capsys.readouterr().err
    assert keyring_from_file(data_dir / "master.key").versions == (1,)
