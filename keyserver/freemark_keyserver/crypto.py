"""Envelope encryption for stored secrets and the TTP's signing key.

Keys, triggers and watermarks are secrets (DESIGN §4). Each record is sealed under its own
random data key (AES-256-GCM); the data key is wrapped under a versioned master key. Rotating
the master key therefore re-wraps 32-byte data keys and never decrypts a payload (`rewrap`,
like `MultiFernet.rotate`: encrypt with the newest key, decrypt with any).

Large payloads (registered host models, up to gigabytes) are sealed as a stream instead
(`seal_stream`/`open_stream`): the same wrapped data key, but the payload cut into 1 MiB
segments, each its own AES-GCM ciphertext, so neither sealing nor opening ever holds more than
one segment in memory. The nonces follow the STREAM construction (Hoang, Reyhanitabar,
Rogaway, Vizár 2015): a random prefix, the segment index and a flag set only on the last
segment, so a reordered, dropped, duplicated or truncated sequence fails to open.

Everything that can fail on hostile or corrupted input raises one opaque `CryptoError` that
does not say which check failed (pyca's `InvalidToken`), so the server cannot become an
oracle telling an attacker which byte to change next.

The checking half of signing (`Verifier`, `canonical_json`, `verify_json`, `CryptoError`)
lives in the library's `freemark.signatures`, so auditors verify offline without this
package; it is re-exported here so server code has one import for both halves.

Key files hold secrets, so they are created 0600 atomically (`freemark.secretfile.write_private`,
the one writer of secret files), and a key file that group or others can read is refused rather
than silently used.

Quick start::

    keyring = load_or_create_keyring(Path("state/master.keys"))
    blob = seal(keyring, secret, record_id="r1", owner="alice").to_bytes()
    secret = open_envelope(keyring, Envelope.from_bytes(blob), record_id="r1", owner="alice")

    header, segments = seal_stream(keyring, Path("model.pt2"), record_id="r1", owner="alice")
    stored = list(segments)                  # in practice: written to the store one by one
    for plaintext in open_stream(keyring, header, iter(stored), record_id="r1", owner="alice"):
        ...                                  # use the output only once the loop ends cleanly

    signer = load_or_create_signing_key(Path("state/signing.pem"))
    signature = sign_json(signer, {"record": "r1"})
    Verifier.from_pem(signer.public_key_pem()).verify(signature, canonical_json({"record": "r1"}))
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from freemark.secretfile import write_private
from freemark.signatures import CryptoError, Verifier, canonical_json, public_key_id, verify_json

__all__ = [
    "CryptoError",
    "Envelope",
    "MasterKeyring",
    "SigningKey",
    "StreamHeader",
    "Verifier",
    "canonical_json",
    "is_stream_header",
    "keyring_from_env",
    "keyring_from_file",
    "load_or_create_keyring",
    "load_or_create_signing_key",
    "open_envelope",
    "open_stream",
    "rewrap",
    "rewrap_stream",
    "save_keyring",
    "seal",
    "seal_stream",
    "sign_json",
    "signing_key_from_pem",
    "verify_json",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random nonces are safe for < 2**32 uses per key
TAG_BYTES = 16
MAX_KEY_VERSION = 2**32 - 1  # the envelope stores the version as a u32

# Envelope blob: magic, layout version, then fixed-size fields; the payload ciphertext is the rest.
_ENVELOPE_MAGIC = b"FMENV"
_ENVELOPE_LAYOUT = 1
_ENVELOPE_HEADER = struct.Struct(
    f">{len(_ENVELOPE_MAGIC)}sBI{NONCE_BYTES}s{KEY_BYTES + TAG_BYTES}s{NONCE_BYTES}s"
)

# Domain labels keep a wrapped key from ever being accepted as a payload and vice versa, and
# a stream's wrapped key or segment from being accepted as an envelope's.
_WRAP_LABEL = "freemark/v1/envelope/wrap"
_PAYLOAD_LABEL = "freemark/v1/envelope/payload"
_STREAM_WRAP_LABEL = "freemark/v1/stream/wrap"
_STREAM_SEGMENT_LABEL = "freemark/v1/stream/segment"

# Streams: plaintext segment size, and the STREAM nonce layout (prefix ‖ u32 index ‖ u8 last).
# 1 MiB keeps memory flat and the per-segment overhead (a 16-byte tag, one AES-GCM call) small.
SEGMENT_BYTES = 1 << 20
_STREAM_PREFIX_BYTES = NONCE_BYTES - 5
_STREAM_MAGIC = b"FMSTR"
_STREAM_LAYOUT = 1
_STREAM_HEADER = struct.Struct(
    f">{len(_STREAM_MAGIC)}sBI{NONCE_BYTES}s{KEY_BYTES + TAG_BYTES}s{_STREAM_PREFIX_BYTES}sIIQ"
)

# --- master keys ---------------------------------------------------------------------------


class MasterKeyring:
    """Versioned AES-256 master keys: wrap with the newest version, unwrap with any.

    Immutable, so a server can swap in a rotated keyring without locking readers.
    """

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise ValueError("a master keyring needs at least one key")
        for version, key in keys.items():
            if type(version) is not int or not 1 <= version <= MAX_KEY_VERSION:
                raise ValueError(f"master key versions are integers in 1..2**32-1, got {version!r}")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValueError(f"master key version {version} must be {KEY_BYTES} bytes")
        self._keys = dict(keys)

    @property
    def current_version(self) -> int:
        """The version new envelopes are wrapped under: the highest one."""
        return max(self._keys)

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version this keyring can unwrap, ascending."""
        return tuple(sorted(self._keys))

    def generate_new_version(self) -> MasterKeyring:
        """Return a new keyring with a fresh random key as the newest version (rotation step 1).

        The old versions stay, so existing envelopes still open until `rewrap` moves them on.
        """
        return MasterKeyring({**self._keys, self.current_version + 1: AESGCM.generate_key(256)})

    def _key(self, version: int) -> bytes:
        try:
            return self._keys[version]
        except KeyError:
            raise CryptoError() from None

    def __repr__(self) -> str:
        return f"MasterKeyring(versions={list(self.versions)})"


def keyring_from_env(value: str) -> MasterKeyring:
    """Parse a keyring from text: comma-separated `<version>:<standard base64 of 32 bytes>`.

    Example: `1:q83v...=,2:7xQ...=`. Whitespace around entries is ignored. This is also the
    key file format, so a deployment can move keys between a file and an environment variable.
    Error messages name the entry by position and never echo it, since it holds key material.
    """
    entries = [entry.strip() for entry in value.split(",")]
    if entries == [""]:
        raise ValueError("keyring text is empty; expected '<version>:<base64 key>[,...]'")
    keys: dict[int, bytes] = {}
    for position, entry in enumerate(entries, start=1):
        version, key = _parse_keyring_entry(position, entry)
        if version in keys:
            raise ValueError(f"keyring entry {position}: version {version} appears twice")
        keys[version] = key
    return MasterKeyring(keys)


def _parse_keyring_entry(position: int, entry: str) -> tuple[int, bytes]:
    where = f"keyring entry {position}"
    version_text, sep, key_text = entry.partition(":")
    if not sep or not version_text.isascii() or not version_text.isdigit():
        raise ValueError(f"{where} must look like '<version>:<base64 key>' with a decimal version")
    version = int(version_text)
    if not 1 <= version <= MAX_KEY_VERSION:
        raise ValueError(f"{where}: versions run from 1 to 2**32-1")
    try:
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the key is not valid standard base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where}: the key must decode to {KEY_BYTES} bytes, got {len(key)}")
    return version, key


def _keyring_to_text(keyring: MasterKeyring) -> str:
    return ",".join(
        f"{version}:{base64.b64encode(keyring._key(version)).decode('ascii')}"
        for version in keyring.versions
    )


def keyring_from_file(path: Path) -> MasterKeyring:
    """Load a keyring saved by `save_keyring`, refusing a file that others can read."""
    return _parse_keyring_file(path, _read_secret_file(path))


def _parse_keyring_file(path: Path, data: bytes) -> MasterKeyring:
    try:
        return keyring_from_env(data.decode("ascii"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a keyring file (not ASCII text)") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def save_keyring(path: Path, keyring: MasterKeyring) -> None:
    """Atomically replace `path` with `keyring` (mode 0600): readers see the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, (_keyring_to_text(keyring) + "\n").encode("ascii"))


def load_or_create_keyring(path: Path) -> MasterKeyring:
    """Load the keyring at `path`, or create it with one fresh key (version 1) on first start."""

    def fresh() -> bytes:
        keyring = MasterKeyring({1: AESGCM.generate_key(256)})
        return (_keyring_to_text(keyring) + "\n").encode("ascii")

    return _parse_keyring_file(path, _load_or_create(path, fresh))


# --- envelopes -----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Envelope:
    """One sealed record: its data key wrapped under master key `key_version`, and the payload.

    `to_bytes`/`from_bytes` give one blob for storage: `FMENV`, a layout byte, the key version
    (u32 big-endian), the wrap nonce, the wrapped key, the payload nonce, then the ciphertext.
    """

    key_version: int
    wrapped_key: bytes
    wrap_nonce: bytes
    payload_nonce: bytes
    ciphertext: bytes

    def __post_init__(self) -> None:
        # struct would silently pad or cut a wrong-sized field; refuse it instead.
        sizes = (len(self.wrap_nonce), len(self.wrapped_key), len(self.payload_nonce))
        if sizes != (NONCE_BYTES, KEY_BYTES + TAG_BYTES, NONCE_BYTES):
            raise ValueError(f"envelope nonce or wrapped key has the wrong size: {sizes}")
        if not 0 < self.key_version <= MAX_KEY_VERSION or len(self.ciphertext) < TAG_BYTES:
            raise ValueError("envelope key version or ciphertext is out of range")

    def to_bytes(self) -> bytes:
        """Serialise to the versioned binary layout described on the class."""
        header = _ENVELOPE_HEADER.pack(
            _ENVELOPE_MAGIC,
            _ENVELOPE_LAYOUT,
            self.key_version,
            self.wrap_nonce,
            self.wrapped_key,
            self.payload_nonce,
        )
        return header + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse a blob from `to_bytes`; a malformed blob raises the same opaque `CryptoError`."""
        if len(data) < _ENVELOPE_HEADER.size + TAG_BYTES:
            raise CryptoError()
        magic, layout, key_version, wrap_nonce, wrapped_key, payload_nonce = (
            _ENVELOPE_HEADER.unpack_from(data)
        )
        if magic != _ENVELOPE_MAGIC or layout != _ENVELOPE_LAYOUT or key_version == 0:
            raise CryptoError()
        return cls(
            key_version=key_version,
            wrapped_key=wrapped_key,
            wrap_nonce=wrap_nonce,
            payload_nonce=payload_nonce,
            ciphertext=data[_ENVELOPE_HEADER.size :],
        )

    def __repr__(self) -> str:
        return f"Envelope(key_version={self.key_version}, ciphertext={len(self.ciphertext)} bytes)"


def _associated_data(label: str, *fields: str | int) -> bytes:
    """Length-prefix every field so that ("ab", "c") and ("a", "bc") never collide."""
    parts = [label.encode("utf-8"), *(_field_bytes(field) for field in fields)]
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _field_bytes(field: str | int) -> bytes:
    if isinstance(field, int):
        return struct.pack(">Q", field)
    return field.encode("utf-8")


def _wrap_aad(
    label: str, record_id: str, owner: str, key_version: int, shape: tuple[int | str, ...]
) -> bytes:
    return _associated_data(label, record_id, owner, key_version, *shape)


def _payload_aad(record_id: str, owner: str) -> bytes:
    # The master key version is bound through the wrapped data key, not here, so that
    # rotation can re-wrap the data key and leave the payload ciphertext untouched.
    return _associated_data(_PAYLOAD_LABEL, record_id, owner)


def _wrap(
    keyring: MasterKeyring,
    data_key: bytes,
    record_id: str,
    owner: str,
    label: str = _WRAP_LABEL,
    shape: tuple[int | str, ...] = (),
) -> tuple[int, bytes, bytes]:
    """Wrap `data_key` under the newest master key; return (version, wrap nonce, wrapped key).

    `shape` binds further public fields (a stream's layout) to the key, so that changing any
    of them makes the key fail to unwrap.
    """
    version = keyring.current_version
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = AESGCM(keyring._key(version)).encrypt(
        wrap_nonce, data_key, _wrap_aad(label, record_id, owner, version, shape)
    )
    return version, wrap_nonce, wrapped


def _unwrap(
    keyring: MasterKeyring,
    sealed: Envelope | StreamHeader,
    record_id: str,
    owner: str,
    label: str = _WRAP_LABEL,
    shape: tuple[int | str, ...] = (),
) -> bytes:
    master = keyring._key(sealed.key_version)
    aad = _wrap_aad(label, record_id, owner, sealed.key_version, shape)
    return _aead_open(master, sealed.wrap_nonce, sealed.wrapped_key, aad)


def _aead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise CryptoError() from None


def seal(keyring: MasterKeyring, plaintext: bytes, *, record_id: str, owner: str) -> Envelope:
    """Encrypt `plaintext` for one record under a fresh data key wrapped by the newest master key.

    Both ciphertexts are bound to `record_id` and `owner`, so a blob copied onto another record
    or owner fails to open.
    """
    data_key = AESGCM.generate_key(256)
    payload_nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(payload_nonce, plaintext, _payload_aad(record_id, owner))
    version, wrap_nonce, wrapped_key = _wrap(keyring, data_key, record_id, owner)
    return Envelope(
        key_version=version,
        wrapped_key=wrapped_key,
        wrap_nonce=wrap_nonce,
        payload_nonce=payload_nonce,
        ciphertext=ciphertext,
    )


def open_envelope(
    keyring: MasterKeyring, envelope: Envelope, *, record_id: str, owner: str
) -> bytes:
    """Decrypt a sealed record; any mismatch or tampering raises `CryptoError`."""
    data_key = _unwrap(keyring, envelope, record_id, owner)
    return _aead_open(
        data_key, envelope.payload_nonce, envelope.ciphertext, _payload_aad(record_id, owner)
    )


def rewrap(keyring: MasterKeyring, envelope: Envelope, *, record_id: str, owner: str) -> Envelope:
    """Re-wrap the data key under the newest master key; the payload bytes stay as they are.

    Only the 32-byte data key is decrypted, never the payload, so rotation does not expose
    secrets. The unwrap still authenticates the record id and owner binding.
    """
    data_key = _unwrap(keyring, envelope, record_id, owner)
    version, wrap_nonce, wrapped_key = _wrap(keyring, data_key, record_id, owner)
    return replace(envelope, key_version=version, wrapped_key=wrapped_key, wrap_nonce=wrap_nonce)


# --- streams -------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class StreamHeader:
    """What opens a sealed stream: its wrapped data key, nonce prefix and shape.

    The segments themselves are stored elsewhere (for host models, the store's blob table),
    so rotation re-wraps this small header and never touches them. The layout fields are
    public but bound to the wrapped key (`shape`), so an altered header does not open; the
    last-segment flag in each nonce is what catches a truncated segment sequence.

    `to_bytes`/`from_bytes`: `FMSTR`, a layout byte, the key version (u32), the wrap nonce, the
    wrapped key, the nonce prefix, the segment size (u32), the segment count (u32) and the
    plaintext size (u64), all big-endian.
    """

    key_version: int
    wrapped_key: bytes
    wrap_nonce: bytes
    nonce_prefix: bytes
    segment_size: int
    segments: int
    total_size: int

    def __post_init__(self) -> None:
        sizes = (len(self.wrap_nonce), len(self.wrapped_key), len(self.nonce_prefix))
        if sizes != (NONCE_BYTES, KEY_BYTES + TAG_BYTES, _STREAM_PREFIX_BYTES):
            raise ValueError(f"stream nonce, prefix or wrapped key has the wrong size: {sizes}")
        in_range = (
            0 < self.key_version <= MAX_KEY_VERSION
            and 0 < self.segment_size < 2**32
            and 0 < self.segments < 2**32
            and 0 <= self.total_size < 2**64
        )
        if not in_range:
            raise ValueError("stream key version, segment size or counts are out of range")

    @property
    def shape(self) -> tuple[int | str, ...]:
        """The layout fields bound into the wrapped key's associated data."""
        return _stream_shape(self.nonce_prefix, self.segment_size, self.segments, self.total_size)

    def to_bytes(self) -> bytes:
        """Serialise to the versioned binary layout described on the class."""
        return _STREAM_HEADER.pack(
            _STREAM_MAGIC,
            _STREAM_LAYOUT,
            self.key_version,
            self.wrap_nonce,
            self.wrapped_key,
            self.nonce_prefix,
            self.segment_size,
            self.segments,
            self.total_size,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamHeader:
        """Parse a header from `to_bytes`; a malformed one raises the opaque `CryptoError`."""
        if len(data) != _STREAM_HEADER.size:
            raise CryptoError()
        magic, layout, version, wrap_nonce, wrapped, prefix, segment_size, segments, total = (
            _STREAM_HEADER.unpack(data)
        )
        if magic != _STREAM_MAGIC or layout != _STREAM_LAYOUT:
            raise CryptoError()
        try:
            return cls(version, wrapped, wrap_nonce, prefix, segment_size, segments, total)
        except ValueError:
            raise CryptoError() from None

    def __repr__(self) -> str:
        return (
            f"StreamHeader(key_version={self.key_version}, segments={self.segments}, "
            f"total_size={self.total_size})"
        )


def _stream_shape(
    prefix: bytes, segment_size: int, segments: int, total_size: int
) -> tuple[int | str, ...]:
    return (prefix.hex(), segment_size, segments, total_size)


def is_stream_header(data: bytes) -> bool:
    """Whether stored bytes are a `StreamHeader` (rather than an `Envelope`), by their magic."""
    return data.startswith(_STREAM_MAGIC)


def _segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """STREAM's nonce: the index and the last flag make every segment's position part of it."""
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _segment_aad(record_id: str, owner: str) -> bytes:
    # As for envelopes, the master key version is bound through the wrapped key only.
    return _associated_data(_STREAM_SEGMENT_LABEL, record_id, owner)


def seal_stream(
    keyring: MasterKeyring,
    path: Path,
    *,
    record_id: str,
    owner: str,
    segment_size: int = SEGMENT_BYTES,
) -> tuple[StreamHeader, Iterator[bytes]]:
    """Seal the file at `path` for one record: its header, and its sealed segments lazily.

    The segments are read and encrypted one at a time as the iterator is consumed, so memory
    stays at one segment whatever the file size. The header is known up front from the file's
    size; a file that changes size while it is read makes the iterator raise `ValueError`,
    since the header would no longer describe it. An empty file gives one (empty) segment.
    """
    if not 0 < segment_size < 2**32:
        raise ValueError(f"segment_size must be in 1..2**32-1, got {segment_size}")
    total_size = path.stat().st_size
    segments = max(1, -(-total_size // segment_size))
    data_key = AESGCM.generate_key(256)
    prefix = os.urandom(_STREAM_PREFIX_BYTES)
    version, wrap_nonce, wrapped_key = _wrap(
        keyring,
        data_key,
        record_id,
        owner,
        _STREAM_WRAP_LABEL,
        _stream_shape(prefix, segment_size, segments, total_size),
    )
    header = StreamHeader(
        key_version=version,
        wrapped_key=wrapped_key,
        wrap_nonce=wrap_nonce,
        nonce_prefix=prefix,
        segment_size=segment_size,
        segments=segments,
        total_size=total_size,
    )

    def sealed() -> Iterator[bytes]:
        aead = AESGCM(data_key)
        aad = _segment_aad(record_id, owner)
        with path.open("rb") as source:
            for index in range(segments):
                plaintext = source.read(segment_size)
                last = index == segments - 1
                expected = total_size - index * segment_size if last else segment_size
                if len(plaintext) != expected or (last and source.read(1)):
                    raise ValueError(f"{path} changed size while it was being sealed")
                nonce = _segment_nonce(header.nonce_prefix, index, last)
                yield aead.encrypt(nonce, plaintext, aad)

    return header, sealed()


def open_stream(
    keyring: MasterKeyring,
    header: StreamHeader,
    segments: Iterable[bytes],
    *,
    record_id: str,
    owner: str,
) -> Iterator[bytes]:
    """Decrypt a sealed stream segment by segment; any tampering raises `CryptoError`.

    Each plaintext segment is yielded once it is authenticated, but a truncated or extended
    sequence is only detected at the end: write the output somewhere private and use it only
    if the iteration finishes without raising.
    """
    data_key = _unwrap(keyring, header, record_id, owner, _STREAM_WRAP_LABEL, header.shape)
    aead = AESGCM(data_key)
    aad = _segment_aad(record_id, owner)
    count = total = 0
    for index, ciphertext in enumerate(segments):
        if index >= header.segments:
            raise CryptoError()
        nonce = _segment_nonce(header.nonce_prefix, index, index == header.segments - 1)
        try:
            plaintext = aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError):
            raise CryptoError() from None
        count, total = index + 1, total + len(plaintext)
        yield plaintext
    if count != header.segments or total != header.total_size:
        raise CryptoError()


def rewrap_stream(
    keyring: MasterKeyring, header: StreamHeader, *, record_id: str, owner: str
) -> StreamHeader:
    """Re-wrap a stream's data key under the newest master key; no segment is read or changed."""
    data_key = _unwrap(keyring, header, record_id, owner, _STREAM_WRAP_LABEL, header.shape)
    version, wrap_nonce, wrapped_key = _wrap(
        keyring, data_key, record_id, owner, _STREAM_WRAP_LABEL, header.shape
    )
    return replace(header, key_version=version, wrapped_key=wrapped_key, wrap_nonce=wrap_nonce)


# --- signing -------------------------------------------------------------------------------


class SigningKey:
    """The TTP's Ed25519 signing key: receipts, verdicts and log checkpoints are signed with it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.key_id = public_key_id(private_key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh in-memory key; use `load_or_create_signing_key` for one that persists."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        """Sign raw bytes; sign canonical bytes only (see `sign_json`)."""
        return self._private_key.sign(message)

    def public_key_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM, for auditors and clients."""
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> Verifier:
        """The matching `Verifier`."""
        return Verifier(self._private_key.public_key())

    def _private_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def signing_key_from_pem(pem: bytes) -> SigningKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key."""
    private_key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("the private key is not an Ed25519 key")  # noqa: TRY004 (bad input)
    return SigningKey(private_key)


def load_or_create_signing_key(path: Path) -> SigningKey:
    """Load the signing key at `path`, or generate one (PKCS#8 PEM, mode 0600) on first start."""
    pem = _load_or_create(path, lambda: SigningKey.generate()._private_pem())
    return signing_key_from_pem(pem)


def sign_json(signer: SigningKey, obj: Any) -> bytes:
    """Sign the canonical JSON of `obj`."""
    return signer.sign(canonical_json(obj))


# --- secret files --------------------------------------------------------------------------


def _read_secret_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others may access."""
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file")
        if mode & 0o077:
            raise ValueError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"it holds key material: run `chmod 600 {path}`"
            )
        return handle.read()


def _load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """Return the key file's bytes, creating it from `make()` if absent (race-safe)."""
    try:
        return _read_secret_file(path)
    except FileNotFoundError:
        pass
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        write_private(path, data, exclusive=True)
    except FileExistsError:  # another process created it first: use theirs
        return _read_secret_file(path)
    return data
