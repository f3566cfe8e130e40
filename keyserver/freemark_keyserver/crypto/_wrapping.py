"""Data keys wrapped under the master keyring, and the associated data that binds them.

Private: shared by `envelope` and `stream`, which differ only in their domain labels and in
the public layout (`shape`) a stream binds to its wrapped key.
"""

from __future__ import annotations

import struct
from typing import Protocol

from freemark_keyserver.crypto._primitives import NONCE_BYTES, Aead, random_bytes
from freemark_keyserver.crypto.keyring import MasterKeyring

__all__ = ["Wrapped", "associated_data", "unwrap_data_key", "wrap_data_key"]


class Wrapped(Protocol):
    """What a sealed object carries to find and open its data key."""

    @property
    def key_version(self) -> int: ...

    @property
    def wrap_nonce(self) -> bytes: ...

    @property
    def wrapped_key(self) -> bytes: ...


def associated_data(label: str, *fields: str | int) -> bytes:
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
    return associated_data(label, record_id, owner, key_version, *shape)


def wrap_data_key(
    keyring: MasterKeyring,
    data_key: bytes,
    record_id: str,
    owner: str,
    label: str,
    shape: tuple[int | str, ...] = (),
) -> tuple[int, bytes, bytes]:
    """Wrap `data_key` under the newest master key; return (version, wrap nonce, wrapped key).

    `shape` binds further public fields (a stream's layout) to the key, so that changing any
    of them makes the key fail to unwrap.
    """
    version = keyring.current_version
    wrap_nonce = random_bytes(NONCE_BYTES)
    wrapped = Aead(keyring._key(version)).seal(
        wrap_nonce, data_key, _wrap_aad(label, record_id, owner, version, shape)
    )
    return version, wrap_nonce, wrapped


def unwrap_data_key(
    keyring: MasterKeyring,
    sealed: Wrapped,
    record_id: str,
    owner: str,
    label: str,
    shape: tuple[int | str, ...] = (),
) -> bytes:
    """The data key of `sealed`; `CryptoError` on an unknown version or any mismatch."""
    master = keyring._key(sealed.key_version)
    aad = _wrap_aad(label, record_id, owner, sealed.key_version, shape)
    return Aead(master).open(sealed.wrap_nonce, sealed.wrapped_key, aad)
