"""The TTP's Ed25519 signing key: receipts, verdicts and log checkpoints are signed with it.

Only the signing half lives here; the checking half (`Verifier`, `canonical_json`,
`verify_json`) is the library's `freemark.tlog.signatures`, so auditors verify offline without the
server. Sign canonical bytes only (`sign_json`), never a protobuf serialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freemark.tlog.signatures import Verifier, canonical_json, public_key_id
from freemark_keyserver.crypto._keyfiles import load_or_create
from freemark_keyserver.crypto._primitives import (
    Ed25519PrivateKey,
    ed25519_from_pem,
    ed25519_generate,
    ed25519_private_pem,
    ed25519_public_pem,
)

__all__ = ["SigningKey", "load_or_create_signing_key", "sign_json", "signing_key_from_pem"]


class SigningKey:
    """The TTP's Ed25519 signing key: receipts, verdicts and log checkpoints are signed with it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.key_id = public_key_id(private_key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh in-memory key; use `load_or_create_signing_key` for one that persists."""
        return cls(ed25519_generate())

    def sign(self, message: bytes) -> bytes:
        """Sign raw bytes; sign canonical bytes only (see `sign_json`)."""
        return self._private_key.sign(message)

    def public_key_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM, for auditors and clients."""
        return ed25519_public_pem(self._private_key.public_key())

    def verifier(self) -> Verifier:
        """The matching `Verifier`."""
        return Verifier(self._private_key.public_key())

    def _private_pem(self) -> bytes:
        return ed25519_private_pem(self._private_key)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def signing_key_from_pem(pem: bytes) -> SigningKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key."""
    return SigningKey(ed25519_from_pem(pem))


def load_or_create_signing_key(path: Path) -> SigningKey:
    """Load the signing key at `path`, or generate one (PKCS#8 PEM, mode 0600) on first start."""
    pem = load_or_create(path, lambda: SigningKey.generate()._private_pem())
    return signing_key_from_pem(pem)


def sign_json(signer: SigningKey, obj: Any) -> bytes:
    """Sign the canonical JSON of `obj`."""
    return signer.sign(canonical_json(obj))
