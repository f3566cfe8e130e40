"""Streams: a large payload (a registered host model) sealed segment by segment.

The same wrapped data key as an envelope, but the payload cut into 1 MiB segments, each its
own AES-GCM ciphertext, so neither sealing nor opening ever holds more than one segment in
memory. The nonces follow the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015):
a random prefix, the segment index and a flag set only on the last segment, so a reordered,
dropped, duplicated or truncated sequence fails to open.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

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

__all__ = [
    "SEGMENT_BYTES",
    "StreamHeader",
    "is_stream_header",
    "open_stream",
    "rewrap_stream",
    "seal_stream",
]

# Domain labels: a stream's wrapped key or segment is never accepted as an envelope's.
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
    return associated_data(_STREAM_SEGMENT_LABEL, record_id, owner)


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
    data_key = new_key()
    prefix = random_bytes(_STREAM_PREFIX_BYTES)
    version, wrap_nonce, wrapped_key = wrap_data_key(
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
        aead = Aead(data_key)
        aad = _segment_aad(record_id, owner)
        with path.open("rb") as source:
            for index in range(segments):
                plaintext = source.read(segment_size)
                last = index == segments - 1
                expected = total_size - index * segment_size if last else segment_size
                if len(plaintext) != expected or (last and source.read(1)):
                    raise ValueError(f"{path} changed size while it was being sealed")
                nonce = _segment_nonce(header.nonce_prefix, index, last)
                yield aead.seal(nonce, plaintext, aad)

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
    data_key = unwrap_data_key(keyring, header, record_id, owner, _STREAM_WRAP_LABEL, header.shape)
    aead = Aead(data_key)
    aad = _segment_aad(record_id, owner)
    count = total = 0
    for index, ciphertext in enumerate(segments):
        if index >= header.segments:
            raise CryptoError()
        nonce = _segment_nonce(header.nonce_prefix, index, index == header.segments - 1)
        plaintext = aead.open(nonce, ciphertext, aad)
        count, total = index + 1, total + len(plaintext)
        yield plaintext
    if count != header.segments or total != header.total_size:
        raise CryptoError()


def rewrap_stream(
    keyring: MasterKeyring, header: StreamHeader, *, record_id: str, owner: str
) -> StreamHeader:
    """Re-wrap a stream's data key under the newest master key; no segment is read or changed."""
    data_key = unwrap_data_key(keyring, header, record_id, owner, _STREAM_WRAP_LABEL, header.shape)
    version, wrap_nonce, wrapped_key = wrap_data_key(
        keyring, data_key, record_id, owner, _STREAM_WRAP_LABEL, header.shape
    )
    return replace(header, key_version=version, wrapped_key=wrapped_key, wrap_nonce=wrap_nonce)
