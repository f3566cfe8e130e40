"""The only module that touches `cryptography`'s primitives: AES-256-GCM and Ed25519.

Private (pyca's layering: safe recipes over hazardous materials). The recipes in `envelope`,
`stream`, `keyring` and `signing` go through these wrappers, which fix the key size, and turn
every authentication failure into the one opaque `CryptoError`.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from freemark.tlog.signatures import CryptoError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "Aead",
    "Ed25519PrivateKey",
    "ed25519_from_pem",
    "ed25519_generate",
    "ed25519_private_pem",
    "ed25519_public_pem",
    "new_key",
    "random_bytes",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random nonces are safe for < 2**32 uses per key
TAG_BYTES = 16


def new_key() -> bytes:
    """A fresh random AES-256 key."""
    return AESGCM.generate_key(256)


def random_bytes(n: int) -> bytes:
    """`n` bytes from the OS CSPRNG (nonces, nonce prefixes)."""
    return os.urandom(n)


class Aead:
    """AES-256-GCM under one key; `open` raises `CryptoError` on any failure, saying nothing."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        """Ciphertext with its 16-byte tag appended."""
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes) -> bytes:
        """The plaintext, or `CryptoError` if the tag, nonce or associated data do not match."""
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError):
            raise CryptoError() from None


def ed25519_generate() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def ed25519_private_pem(private_key: Ed25519PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (for a 0600 key file)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ed25519_public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo PEM."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ed25519_from_pem(pem: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM private key; `ValueError` unless it is Ed25519."""
    private_key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("the private key is not an Ed25519 key")  # noqa: TRY004 (bad input)
    return private_key
