"""Registered host models at rest: sealed in segments, stored beside their registration.

A host model can be gigabytes, and the server must never hold one whole in memory (upload,
seal, store and read back each go one megabyte segment at a time). `store_host` seals the
received upload (a sealed memfd) with `crypto.seal_stream` into the store's host blob table and returns the
stream header, which the registration row keeps in its ``host_envelope`` column; `host_file`
opens it again into a sealed memory file (memfd) for the sandbox, so no plaintext host ever
rests on disk, not even while a Verify runs; `rewrap_host` re-wraps its data
key for master key rotation without reading a single segment.

The record id bound into the ciphertext is the registration id with a ``/host`` suffix, so the
host's data key can never stand in for the bundle's (whose record id is the bare id).
Registrations written before schema version 3 hold the whole host in one envelope; they are
still opened and re-wrapped here.

The operator's reference panel members (`PanelMember`) are models at rest too and are
sealed the same way, under their member id (record id suffix ``/panel``, owner "operator").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freemark_keyserver import memfiles
from freemark_keyserver.crypto import (
    Envelope,
    MasterKeyring,
    StreamHeader,
    is_stream_header,
    open_envelope,
    open_stream,
    rewrap,
    rewrap_stream,
    seal_stream,
)
from freemark_keyserver.store import PanelMember, Registration, Store

__all__ = [
    "PANEL_OWNER",
    "host_file",
    "member_file",
    "rewrap_host",
    "rewrap_member",
    "store_host",
    "store_member",
]

PANEL_OWNER = "operator"  # the owner bound into panel members' ciphertexts


def _record_id(registration_id: str) -> str:
    return registration_id + "/host"


def store_host(
    store: Store, keyring: MasterKeyring, path: Path, *, registration_id: str, owner: str
) -> bytes:
    """Seal the host at `path` into the store under `registration_id`; return its header.

    Call before appending the registration that carries the header: until then the segments
    are unreferenced, and if the append never happens the store collects them as orphans.
    """
    header, segments = seal_stream(
        keyring, path, record_id=_record_id(registration_id), owner=owner
    )
    store.put_host_blob(registration_id, segments)
    return header.to_bytes()


@contextmanager
def host_file(store: Store, keyring: MasterKeyring, record: Registration) -> Iterator[Path]:
    """The registered host, decrypted into a sealed memfd (`memfiles.filled`), never a file.

    A segment that fails to authenticate, or a missing one, raises `CryptoError` before the
    path is handed out.
    """
    with memfiles.filled("freemark-host", _plaintext(store, keyring, record)) as path:
        yield path


def _plaintext(store: Store, keyring: MasterKeyring, record: Registration) -> Iterator[bytes]:
    sealed = record.host_envelope
    record_id = _record_id(record.registration_id)
    if is_stream_header(sealed):
        yield from open_stream(
            keyring,
            StreamHeader.from_bytes(sealed),
            store.host_blob(record.registration_id),
            record_id=record_id,
            owner=record.owner,
        )
    else:
        envelope = Envelope.from_bytes(sealed)
        yield open_envelope(keyring, envelope, record_id=record_id, owner=record.owner)


def rewrap_host(keyring: MasterKeyring, record: Registration) -> bytes:
    """The record's host header (or pre-v3 envelope) with its data key under the newest master
    key; the segments are not read."""
    sealed = record.host_envelope
    record_id = _record_id(record.registration_id)
    if is_stream_header(sealed):
        header = StreamHeader.from_bytes(sealed)
        return rewrap_stream(keyring, header, record_id=record_id, owner=record.owner).to_bytes()
    envelope = Envelope.from_bytes(sealed)
    return rewrap(keyring, envelope, record_id=record_id, owner=record.owner).to_bytes()


def _member_record_id(member_id: str) -> str:
    return member_id + "/panel"


def store_member(store: Store, keyring: MasterKeyring, path: Path, *, member_id: str) -> bytes:
    """Seal a panel member's model under `member_id`; return its stream header."""
    header, segments = seal_stream(keyring, path, record_id=_member_record_id(member_id),
                                   owner=PANEL_OWNER)
    store.put_host_blob(member_id, segments)
    return header.to_bytes()


@contextmanager
def member_file(store: Store, keyring: MasterKeyring, member: PanelMember) -> Iterator[Path]:
    """A panel member's model, decrypted into a sealed memfd (`memfiles.filled`)."""
    segments = open_stream(keyring, StreamHeader.from_bytes(member.envelope),
                           store.host_blob(member.member_id),
                           record_id=_member_record_id(member.member_id), owner=PANEL_OWNER)
    with memfiles.filled("freemark-panel", segments) as path:
        yield path


def rewrap_member(keyring: MasterKeyring, member: PanelMember) -> bytes:
    """The member's stream header with its data key under the newest master key."""
    return rewrap_stream(keyring, StreamHeader.from_bytes(member.envelope),
                         record_id=_member_record_id(member.member_id),
                         owner=PANEL_OWNER).to_bytes()
