"""Checking the TTP's signatures: canonical JSON, the Ed25519 `Verifier`, key ids.

Everything a client needs to check a receipt, a verdict or a checkpoint offline lives here,
in the library, so that an auditor holding only the TTP's public key never needs the server
package. The server signs with `freemark_keyserver.crypto.SigningKey`, which shares the key
id and canonical form defined here, so both sides agree by construction.

A failed check raises one opaque `CryptoError` that does not say why (pyca's `InvalidToken`).

Quick start::

    verifier = Verifier.from_pem(public_key_pem)
    verifier.verify(signature, canonical_json({"record": "r1"}))   # raises CryptoError if bad
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from freemark.errors import CryptoError
from freemark.tlog.canonical import canonical_json

__all__ = [
    "KEY_ID_HEX_CHARS",
    "CryptoError",
    "Verifier",
    "canonical_json",
    "public_key_id",
    "verify_json",
]

KEY_ID_HEX_CHARS = 16


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of SHA-256 of the raw public key: names the key in signed bodies."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


class Verifier:
    """An Ed25519 public key that checks signatures and raises, never returns a bool."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._public_key = public_key
        self.key_id = public_key_id(public_key)

    @classmethod
    def from_pem(cls, pem: bytes) -> Verifier:
        """Load a SubjectPublicKeyInfo PEM, as `SigningKey.public_key_pem` writes it."""
        public_key = serialization.load_pem_public_key(pem)
        if not isinstance(public_key, Ed25519PublicKey):
            raise ValueError("the public key is not an Ed25519 key")  # noqa: TRY004 (bad input)
        return cls(public_key)

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (RFC 8032), as signed-note key ids hash it."""
        return self._public_key.public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise `CryptoError` unless `signature` is this key's signature over `message`."""
        try:
            self._public_key.verify(signature, message)
        except InvalidSignature:
            raise CryptoError() from None

    def __repr__(self) -> str:
        return f"Verifier(key_id={self.key_id!r})"


def verify_json(verifier: Verifier, obj: Any, signature: bytes) -> None:
    """Raise `CryptoError` unless `signature` covers the canonical JSON of `obj`."""
    verifier.verify(signature, canonical_json(obj))
