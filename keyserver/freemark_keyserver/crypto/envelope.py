"""Envelopes: one record sealed under its own data key, wrapped by the master keyring.

Each record is sealed under its own random data key (AES-256-GCM); the data key is wrapped
under a versioned master key. Both ciphertexts are bound to the record id and owner through
their associated data, so a blob copied onto another record fails to open. Rotating the
master key re-wraps the 32-byte data key and never decrypts the payload (`rewrap`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from freemark.tlog.signatures import CryptoError
from freemark_keyserver.crypto._primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    Aead,
    new_key,
    random_bytes,
)
from freemark_keyserver.crypto._wrapping import associated_data, unwrap_data_key, wrap_data_key
from freemark_keyserver.crypto.keyring import MAX_KEY_VERSION, MasterKeyring

__all__ = ["Envelope", "open_envelope", "rewrap", "seal"]

# Envelope blob: magic, layout version, then fixed-size fields; the payload ciphertext is the rest.
_ENVELOPE_MAGIC = b"FMENV"
_ENVELOPE_LAYOUT = 1
_ENVELOPE_HEADER = struct.Struct(
    f">{len(_ENVELOPE_MAGIC)}sBI{NONCE_BYTES}s{KEY_BYTES + TAG_BYTES}s{NONCE_BYTES}s"
)

# Domain labels keep a wrapped key from ever being accepted as a payload and vice versa, and
# (with the stream's own labels) a stream's wrapped key or segment from being accepted as an
# envelope's.
_WRAP_LABEL = "freemark/v1/envelope/wrap"
_PAYLOAD_LABEL = "freemark/v1/envelope/payload"


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


def _payload_aad(record_id: str, owner: str) -> bytes:
    # The master key version is bound through the wrapped data key, not here, so that
    # rotation can re-wrap the data key and leave the payload ciphertext untouched.
    return associated_data(_PAYLOAD_LABEL, record_id, owner)


def seal(keyring: MasterKeyring, plaintext: bytes, *, record_id: str, owner: str) -> Envelope:
    """Encrypt `plaintext` for one record under a fresh data key wrapped by the newest master key.

    Both ciphertexts are bound to `record_id` and `owner`, so a blob copied onto another record
    or owner fails to open.
    """
    data_key = new_key()
    payload_nonce = random_bytes(NONCE_BYTES)
    ciphertext = Aead(data_key).seal(payload_nonce, plaintext, _payload_aad(record_id, owner))
    version, wrap_nonce, wrapped_key = wrap_data_key(
        keyring, data_key, record_id, owner, _WRAP_LABEL
    )
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
    data_key = unwrap_data_key(keyring, envelope, record_id, owner, _WRAP_LABEL)
    return Aead(data_key).open(
        envelope.payload_nonce, envelope.ciphertext, _payload_aad(record_id, owner)
    )


def rewrap(keyring: MasterKeyring, envelope: Envelope, *, record_id: str, owner: str) -> Envelope:
    """Re-wrap the data key under the newest master key; the payload bytes stay as they are.

    Only the 32-byte data key is decrypted, never the payload, so rotation does not expose
    secrets. The unwrap still authenticates the record id and owner binding.
    """
    data_key = unwrap_data_key(keyring, envelope, record_id, owner, _WRAP_LABEL)
    version, wrap_nonce, wrapped_key = wrap_data_key(
        keyring, data_key, record_id, owner, _WRAP_LABEL
    )
    return replace(envelope, key_version=version, wrapped_key=wrapped_key, wrap_nonce=wrap_nonce)
