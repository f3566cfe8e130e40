"""Versioned master keys, and the keyring file and environment formats.

Like `MultiFernet`: new data keys are wrapped with the newest version, any version unwraps;
rotation adds a version (`MasterKeyring.generate_new_version`) and `rewrap`/`rewrap_stream`
move each record's data key onto it without decrypting a payload.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path

from freemark.tlog.signatures import CryptoError
from freemark_keyserver.crypto._keyfiles import load_or_create, read_secret_file, write_secret_file
from freemark_keyserver.crypto._primitives import KEY_BYTES, new_key

__all__ = [
    "MAX_KEY_VERSION",
    "MasterKeyring",
    "keyring_from_env",
    "keyring_from_file",
    "load_or_create_keyring",
    "save_keyring",
]

MAX_KEY_VERSION = 2**32 - 1  # the envelope stores the version as a u32


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
        return MasterKeyring({**self._keys, self.current_version + 1: new_key()})

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
    return _parse_keyring_file(path, read_secret_file(path))


def _parse_keyring_file(path: Path, data: bytes) -> MasterKeyring:
    try:
        return keyring_from_env(data.decode("ascii"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a keyring file (not ASCII text)") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def save_keyring(path: Path, keyring: MasterKeyring) -> None:
    """Atomically replace `path` with `keyring` (mode 0600): readers see the old or the new."""
    write_secret_file(path, (_keyring_to_text(keyring) + "\n").encode("ascii"))


def load_or_create_keyring(path: Path) -> MasterKeyring:
    """Load the keyring at `path`, or create it with one fresh key (version 1) on first start."""

    def fresh() -> bytes:
        keyring = MasterKeyring({1: new_key()})
        return (_keyring_to_text(keyring) + "\n").encode("ascii")

    return _parse_keyring_file(path, load_or_create(path, fresh))
