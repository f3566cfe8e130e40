"""Envelope encryption, key files and signatures, with real cryptography and no mocks."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from freemark_keyserver.crypto import (
    CryptoError,
    Envelope,
    MasterKeyring,
    ScratchStream,
    SigningKey,
    StreamHeader,
    Verifier,
    canonical_json,
    is_stream_header,
    keyring_from_env,
    keyring_from_file,
    load_or_create_keyring,
    load_or_create_signing_key,
    open_envelope,
    open_stream,
    rewrap,
    rewrap_stream,
    save_keyring,
    seal,
    seal_stream,
    sign_json,
    signing_key_from_pem,
    verify_json,
)

RECORD = {"record_id": "reg-0001", "owner": "alice"}
SECRET = b"A matrix, triggers and a watermark nonce"


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def keyring(master_key: bytes) -> MasterKeyring:
    return MasterKeyring({1: master_key})


# --- envelopes -----------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [SECRET, b"", os.urandom(4096)])
def test_seal_and_open_round_trip_through_the_blob(
    keyring: MasterKeyring, plaintext: bytes
) -> None:
    blob = seal(keyring, plaintext, **RECORD).to_bytes()
    assert open_envelope(keyring, Envelope.from_bytes(blob), **RECORD) == plaintext


def test_each_seal_uses_a_fresh_data_key_and_nonces(keyring: MasterKeyring) -> None:
    first, second = (seal(keyring, SECRET, **RECORD) for _ in range(2))
    assert first.wrapped_key != second.wrapped_key
    assert first.ciphertext != second.ciphertext


@pytest.mark.parametrize(
    "binding",
    [
        {"record_id": "reg-0002", "owner": "alice"},
        {"record_id": "reg-0001", "owner": "mallory"},
        # Naive concatenation would make these two equal to the original binding.
        {"record_id": "reg-000", "owner": "1alice"},
        {"record_id": "reg-0001a", "owner": "lice"},
    ],
    ids=["other-record", "other-owner", "shifted-boundary-left", "shifted-boundary-right"],
)
def test_a_blob_moved_to_another_record_or_owner_does_not_open(
    keyring: MasterKeyring, binding: dict[str, str]
) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(CryptoError):
        open_envelope(keyring, envelope, **binding)


def test_a_different_master_key_with_the_same_version_does_not_open(
    keyring: MasterKeyring,
) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(CryptoError):
        open_envelope(MasterKeyring({1: os.urandom(32)}), envelope, **RECORD)


def test_a_keyring_without_the_envelope_version_does_not_open(keyring: MasterKeyring) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(CryptoError):
        open_envelope(MasterKeyring({2: os.urandom(32)}), envelope, **RECORD)


def test_a_flipped_bit_anywhere_in_the_blob_is_rejected(keyring: MasterKeyring) -> None:
    blob = seal(keyring, SECRET, **RECORD).to_bytes()
    for position in range(len(blob)):
        with pytest.raises(CryptoError):
            open_envelope(keyring, Envelope.from_bytes(_flip(blob, position)), **RECORD)


@pytest.mark.parametrize("cut", [0, 1, 10, 60, -1])
def test_a_truncated_blob_is_rejected(keyring: MasterKeyring, cut: int) -> None:
    blob = seal(keyring, SECRET, **RECORD).to_bytes()
    with pytest.raises(CryptoError):
        open_envelope(keyring, Envelope.from_bytes(blob[:cut]), **RECORD)


def test_an_envelope_with_a_wrong_sized_field_is_refused(keyring: MasterKeyring) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(ValueError, match="wrong size"):
        replace(envelope, wrap_nonce=envelope.wrap_nonce[:8])


def test_rotation_rewraps_the_data_key_and_keeps_the_payload_bytes() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = MasterKeyring({1: old_key})
    after = MasterKeyring({1: old_key, 2: new_key})
    envelope = seal(before, SECRET, **RECORD)

    # Before the re-wrap, the rotated keyring still opens envelopes under version 1.
    assert open_envelope(after, envelope, **RECORD) == SECRET

    moved = rewrap(after, envelope, **RECORD)
    assert moved.key_version == 2
    assert (moved.payload_nonce, moved.ciphertext) == (envelope.payload_nonce, envelope.ciphertext)
    assert moved.wrapped_key != envelope.wrapped_key
    # Once every record is re-wrapped, version 1 can be retired.
    assert open_envelope(MasterKeyring({2: new_key}), moved, **RECORD) == SECRET


def test_rewrap_still_checks_the_record_binding(keyring: MasterKeyring) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(CryptoError):
        rewrap(keyring.generate_new_version(), envelope, record_id="reg-0001", owner="mallory")


def test_generate_new_version_adds_a_newest_key_and_keeps_the_old(
    keyring: MasterKeyring,
) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    rotated = keyring.generate_new_version()
    assert (keyring.versions, rotated.versions) == ((1,), (1, 2))
    assert rotated.current_version == 2
    assert seal(rotated, SECRET, **RECORD).key_version == 2
    assert open_envelope(rotated, envelope, **RECORD) == SECRET


def test_crypto_error_reveals_no_key_material(keyring: MasterKeyring, master_key: bytes) -> None:
    envelope = seal(keyring, SECRET, **RECORD)
    with pytest.raises(CryptoError) as caught:
        open_envelope(keyring, envelope, record_id="reg-0001", owner="mallory")
    error = caught.value
    shown = str(error) + repr(error)
    for form in (master_key.hex(), _b64(master_key), repr(master_key), repr(SECRET)):
        assert form not in shown
    assert error.__cause__ is None and error.__suppress_context__
    assert _b64(master_key) not in repr(keyring)


# --- streams -------------------------------------------------------------------------------

SEGMENT = 64  # small segments, so a few hundred bytes make a multi-segment stream


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "host.pt2"
    path.write_bytes(os.urandom(5 * SEGMENT + 17))
    return path


def _sealed(keyring: MasterKeyring, path: Path) -> tuple[StreamHeader, list[bytes]]:
    header, segments = seal_stream(keyring, path, segment_size=SEGMENT, **RECORD)
    return header, list(segments)


def _opened(
    keyring: MasterKeyring, header: StreamHeader, segments: list[bytes], **record: str
) -> bytes:
    return b"".join(open_stream(keyring, header, iter(segments), **(record or RECORD)))


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, 3 * SEGMENT, 3 * SEGMENT + 1])
def test_a_stream_round_trips_at_every_size(
    keyring: MasterKeyring, tmp_path: Path, size: int
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(size))
    header, segments = _sealed(keyring, path)
    assert header.segments == len(segments) == max(1, -(-size // SEGMENT))
    assert header.total_size == size
    assert StreamHeader.from_bytes(header.to_bytes()) == header
    assert is_stream_header(header.to_bytes())
    assert not is_stream_header(seal(keyring, SECRET, **RECORD).to_bytes())
    assert _opened(keyring, header, segments) == path.read_bytes()


def test_sealing_reads_lazily_and_uses_fresh_keys(keyring: MasterKeyring, payload: Path) -> None:
    first, segments = seal_stream(keyring, payload, segment_size=SEGMENT, **RECORD)
    payload.write_bytes(payload.read_bytes()[:10])  # nothing was read yet: the size is stale
    with pytest.raises(ValueError, match="changed size"):
        list(segments)
    second, _ = seal_stream(keyring, payload, **RECORD)
    assert first.wrapped_key != second.wrapped_key
    assert first.nonce_prefix != second.nonce_prefix


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda s: s[:-1], id="last segment dropped"),
        pytest.param(lambda s: s[:1], id="truncated to the first"),
        pytest.param(lambda s: [], id="empty"),
        pytest.param(lambda s: [s[1], s[0], *s[2:]], id="two swapped"),
        pytest.param(lambda s: [s[0], *s], id="one duplicated"),
        pytest.param(lambda s: [*s, s[-1]], id="last repeated"),
        pytest.param(lambda s: [s[0][:-1], *s[1:]], id="segment cut short"),
        pytest.param(lambda s: [_flip(s[0], 3), *s[1:]], id="bit flipped"),
    ],
)
def test_a_reordered_dropped_or_altered_stream_does_not_open(
    keyring: MasterKeyring, payload: Path, tamper: Callable[[list[bytes]], list[bytes]]
) -> None:
    header, segments = _sealed(keyring, payload)
    with pytest.raises(CryptoError):
        _opened(keyring, header, tamper(segments))


def test_a_header_that_lies_about_the_length_does_not_open(
    keyring: MasterKeyring, payload: Path
) -> None:
    header, segments = _sealed(keyring, payload)
    # Fewer segments: the new last one was sealed without the last flag. More: the real last
    # one carries it. A wrong size: caught by the final count.
    for lie in (
        replace(header, segments=header.segments - 1),
        replace(header, segments=header.segments + 1),
        replace(header, total_size=header.total_size + 1),
    ):
        with pytest.raises(CryptoError):
            _opened(keyring, lie, segments[: lie.segments])


def test_a_stream_moved_to_another_record_or_owner_does_not_open(
    keyring: MasterKeyring, payload: Path
) -> None:
    header, segments = _sealed(keyring, payload)
    for record in (
        {"record_id": "reg-0002", "owner": "alice"},
        {"record_id": "reg-0001", "owner": "mallory"},
    ):
        with pytest.raises(CryptoError):
            _opened(keyring, header, segments, **record)


def test_segments_of_another_stream_of_the_same_record_do_not_open(
    keyring: MasterKeyring, payload: Path
) -> None:
    header, segments = _sealed(keyring, payload)
    _, others = _sealed(keyring, payload)
    with pytest.raises(CryptoError):
        _opened(keyring, header, [others[0], *segments[1:]])


def test_a_flipped_bit_anywhere_in_the_stream_header_is_rejected(
    keyring: MasterKeyring, payload: Path
) -> None:
    header, segments = _sealed(keyring, payload)
    blob = header.to_bytes()
    for position in range(len(blob)):
        with pytest.raises(CryptoError):
            _opened(keyring, StreamHeader.from_bytes(_flip(blob, position)), segments)
    with pytest.raises(CryptoError):
        StreamHeader.from_bytes(blob[:-1])


def test_rotation_rewraps_a_stream_header_and_leaves_its_segments(payload: Path) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    rotated = MasterKeyring({1: old_key, 2: new_key})
    header, segments = _sealed(MasterKeyring({1: old_key}), payload)
    moved = rewrap_stream(rotated, header, **RECORD)
    assert moved.key_version == 2 and moved.wrapped_key != header.wrapped_key
    assert moved.nonce_prefix == header.nonce_prefix
    assert _opened(MasterKeyring({2: new_key}), moved, segments) == payload.read_bytes()
    with pytest.raises(CryptoError):
        rewrap_stream(rotated, header, record_id="reg-0001", owner="mallory")


def test_a_stream_key_is_not_an_envelope_key(keyring: MasterKeyring, payload: Path) -> None:
    """Domain separation: a stream's wrapped key, moved into an envelope, does not unwrap."""
    header, _ = _sealed(keyring, payload)
    envelope = seal(keyring, SECRET, **RECORD)
    swapped = replace(envelope, wrapped_key=header.wrapped_key, wrap_nonce=header.wrap_nonce)
    with pytest.raises(CryptoError):
        open_envelope(keyring, swapped, **RECORD)


# --- scratch streams (a key that lives only in memory) ------------------------------------


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("piece", [1, 7, SEGMENT, SEGMENT + 1, 1000])
@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, 3 * SEGMENT, 3 * SEGMENT + 1])
def test_a_scratch_stream_round_trips_pieces_of_any_size(tmp_path: Path, size: int,
                                                         piece: int) -> None:
    """Pieces as a network delivers them, re-cut into segments: the same bytes come back,
    from a list of segments or from the file they were appended to, which holds only
    ciphertext (the segments' tags and nothing else: no key, no header)."""
    data = os.urandom(size)
    stream = ScratchStream(size, segment_size=SEGMENT)
    sealed = list(stream.seal(iter(_pieces(data, piece))))
    assert len(sealed) == stream.segments == max(1, -(-size // SEGMENT))
    assert all(len(s) == SEGMENT + 16 for s in sealed[:-1])
    assert b"".join(stream.open(iter(sealed))) == data
    path = tmp_path / "spool"
    path.write_bytes(b"".join(sealed))
    assert path.stat().st_size == size + 16 * stream.segments
    fd = os.open(path, os.O_RDONLY)
    try:
        assert b"".join(stream.open_file(fd)) == data
    finally:
        os.close(fd)


def test_a_scratch_stream_refuses_pieces_that_do_not_add_up() -> None:
    data = os.urandom(3 * SEGMENT)
    with pytest.raises(ValueError, match="changed size"):
        list(ScratchStream(len(data) + 1, segment_size=SEGMENT).seal(iter([data])))
    with pytest.raises(ValueError, match="changed size"):
        list(ScratchStream(len(data) - 1, segment_size=SEGMENT).seal(iter([data])))
    with pytest.raises(ValueError, match="changed size"):
        list(ScratchStream(0, segment_size=SEGMENT).seal(iter([b"x"])))


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda s: s[:-1], id="last segment dropped"),
        pytest.param(lambda s: [s[1], s[0], *s[2:]], id="two swapped"),
        pytest.param(lambda s: [*s, s[-1]], id="last repeated"),
        pytest.param(lambda s: [s[0][:-1], *s[1:]], id="segment cut short"),
        pytest.param(lambda s: [_flip(s[0], 3), *s[1:]], id="bit flipped"),
    ],
)
def test_a_tampered_scratch_stream_does_not_open(
        tamper: Callable[[list[bytes]], list[bytes]]) -> None:
    data = os.urandom(5 * SEGMENT + 17)
    stream = ScratchStream(len(data), segment_size=SEGMENT)
    sealed = list(stream.seal(iter([data])))
    with pytest.raises(CryptoError):
        b"".join(stream.open(iter(tamper(sealed))))


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b: _flip(b, 200), id="bit flipped"),
        pytest.param(lambda b: b[:-1], id="truncated by a byte"),
        pytest.param(lambda b: b[:SEGMENT + 16], id="truncated to a segment"),
        pytest.param(lambda b: b + b"\0", id="extended by a byte"),
        pytest.param(lambda b: b"", id="emptied"),
    ],
)
def test_a_tampered_scratch_file_does_not_open(
        tmp_path: Path, tamper: Callable[[bytes], bytes]) -> None:
    data = os.urandom(5 * SEGMENT + 17)
    stream = ScratchStream(len(data), segment_size=SEGMENT)
    path = tmp_path / "spool"
    path.write_bytes(tamper(b"".join(stream.seal(iter([data])))))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CryptoError):
            b"".join(stream.open_file(fd))
    finally:
        os.close(fd)


def test_each_scratch_stream_has_its_own_key_and_shows_none() -> None:
    """Two scratch streams of the same bytes share no ciphertext and neither opens the
    other's segments; the object's repr shows its shape, nothing of its key."""
    data = os.urandom(2 * SEGMENT)
    first, second = (ScratchStream(len(data), segment_size=SEGMENT) for _ in range(2))
    one, two = list(first.seal(iter([data]))), list(second.seal(iter([data])))
    assert not set(one) & set(two)
    with pytest.raises(CryptoError):
        b"".join(second.open(iter(one)))
    assert repr(first) == f"ScratchStream(segments=2, total_size={len(data)})"


# --- keyring text and files ----------------------------------------------------------------


def test_keyring_text_parses_with_whitespace_and_any_order() -> None:
    one, two = os.urandom(32), os.urandom(32)
    keyring = keyring_from_env(f" 2:{_b64(two)} ,\n1:{_b64(one)}\n")
    assert keyring.versions == (1, 2)
    assert keyring.current_version == 2


KEY_TEXT = _b64(bytes(range(32)))
SHORT_KEY_TEXT = _b64(b"0123456789abcdef")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (KEY_TEXT, "entry 1 must look like"),
        (f"one:{KEY_TEXT}", "entry 1 must look like"),
        (f"-1:{KEY_TEXT}", "entry 1 must look like"),
        (f"0:{KEY_TEXT}", "versions run from 1 to 2"),
        (f"4294967296:{KEY_TEXT}", "versions run from 1 to 2"),
        ("1:not base64!", "not valid standard base64"),
        (f"1:{SHORT_KEY_TEXT}", "must decode to 32 bytes, got 16"),
        (f"1:{KEY_TEXT},", "entry 2 must look like"),
        (f"1:{KEY_TEXT},1:{KEY_TEXT}", "version 1 appears twice"),
    ],
)
def test_malformed_keyring_text_is_refused_without_echoing_it(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        keyring_from_env(text)
    for secret_part in (KEY_TEXT, SHORT_KEY_TEXT):
        assert secret_part not in str(caught.value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keyring_file_is_created_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "master.keys"
    created = load_or_create_keyring(path)
    assert _mode(path) == 0o600
    envelope = seal(created, SECRET, **RECORD)
    assert open_envelope(load_or_create_keyring(path), envelope, **RECORD) == SECRET
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.keys"]  # no temp files


def test_save_keyring_replaces_the_file_atomically_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    rotated = load_or_create_keyring(path).generate_new_version()
    save_keyring(path, rotated)
    assert _mode(path) == 0o600
    assert keyring_from_file(path).versions == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.keys"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    keys, pem = tmp_path / "master.keys", tmp_path / "signing.pem"
    load_or_create_keyring(keys)
    load_or_create_signing_key(pem)
    for path, load in ((keys, load_or_create_keyring), (pem, load_or_create_signing_key)):
        path.chmod(mode)
        with pytest.raises(ValueError, match=re.escape(f"chmod 600 {path}")):
            load(path)
    keys.chmod(mode)
    with pytest.raises(ValueError, match=re.escape(str(keys))):
        keyring_from_file(keys)


def test_a_keyring_file_with_bad_content_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    path.write_text("1:garbage")
    path.chmod(0o600)
    with pytest.raises(ValueError, match=re.escape(f"{path}: keyring entry 1")):
        keyring_from_file(path)


# --- signing -------------------------------------------------------------------------------


def test_signing_key_file_is_created_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    created = load_or_create_signing_key(path)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_or_create_signing_key(path)
    assert loaded.key_id == created.key_id == signing_key_from_pem(path.read_bytes()).key_id
    Verifier.from_pem(created.public_key_pem()).verify(loaded.sign(b"m"), b"m")


def test_key_id_is_a_short_hex_digest_shared_by_signer_and_verifier() -> None:
    signer = SigningKey.generate()
    verifier = Verifier.from_pem(signer.public_key_pem())
    assert verifier.key_id == signer.key_id == signer.verifier().key_id
    assert len(signer.key_id) == 16 and int(signer.key_id, 16) >= 0
    assert SigningKey.generate().key_id != signer.key_id


def test_a_flipped_bit_in_message_or_signature_is_rejected() -> None:
    signer = SigningKey.generate()
    verifier = signer.verifier()
    message = canonical_json({"registration": "reg-0001", "tree_size": 7})
    signature = signer.sign(message)
    verifier.verify(signature, message)
    for position in range(len(message)):
        with pytest.raises(CryptoError):
            verifier.verify(signature, _flip(message, position))
    for position in range(len(signature)):
        with pytest.raises(CryptoError):
            verifier.verify(_flip(signature, position), message)


def test_another_keys_signature_is_rejected() -> None:
    signature = SigningKey.generate().sign(b"message")
    with pytest.raises(CryptoError):
        SigningKey.generate().verifier().verify(signature, b"message")


def test_canonical_json_is_rfc8785() -> None:
    assert canonical_json({"b": [1, "é"], "a": 2}) == '{"a":2,"b":[1,"é"]}'.encode()


def test_sign_json_covers_the_canonical_form_not_the_key_order() -> None:
    signer = SigningKey.generate()
    signature = sign_json(signer, {"owner": "alice", "size": 3})
    verify_json(signer.verifier(), {"size": 3, "owner": "alice"}, signature)
    with pytest.raises(CryptoError):
        verify_json(signer.verifier(), {"size": 4, "owner": "alice"}, signature)


def test_a_non_ed25519_pem_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    private_pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        signing_key_from_pem(private_pem)
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        Verifier.from_pem(public_pem)
