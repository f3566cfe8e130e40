"""Streams: a large payload (a registered host model) sealed segment by segment.

The same wrapped data key as an envelope, but the payload cut into 1 MiB segments, each its
own AES-GCM ciphertext, so neither sealing nor opening ever holds more than one segment in
memory. The nonces follow the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015):
a random prefix, the segment index and a flag set only on the last segment, so a reordered,
dropped, duplicated or truncated sequence fails to open.

Two kinds of key seal the same segments. A stored stream's (`seal_stream`/`open_stream`) is
wrapped under the master keyring and bound to its record, so it outlives the process and
rotates. A scratch stream's (`ScratchStream`) is a fresh random key that lives only in the
object, never wrapped and never written: for bytes the server parks on disk for one call and
reads back once (an upload past the spool's memory budget, `rpc.uploads`), which must be
unreadable on disk and need never be read by anyone else.
"""

from __future__ import annotations

import os
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
    "ScratchStream",
    "StreamHeader",
    "is_stream_header",
    "open_stream",
    "rewrap_stream",
    "seal_stream",
]

# Domain labels: a stream's wrapped key or segment is never accepted as an envelope's.
_STREAM_WRAP_LABEL = "freemark/v1/stream/wrap"
_STREAM_SEGMENT_LABEL = "freemark/v1/stream/segment"
_SCRATCH_SEGMENT_LABEL = "freemark/v1/stream/scratch"

# Streams: plaintext segment size, and the STREAM nonce layout (prefix ‖ u32 index ‖ u8 last).
# 1 MiB keeps memory flat and the per-segment overhead (a 16-byte tag, one AES-GCM call) small.
SEGMENT_BYTES = 1 << 20
_STREAM_PREFIX_BYTES = NONCE_BYTES - 5
_STREAM_MAGIC = b"FMSTR"
_STREAM_LAYOUT = 1
_READ_BYTES = 1 << 20  # a scratch file is read back in blocks of about this size
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


def _segment_count(total_size: int, segment_size: int) -> int:
    """Segments of a `total_size`-byte payload: at least one (an empty payload is one empty
    segment, so even it carries the last flag)."""
    return max(1, -(-total_size // segment_size))


def _cut(pieces: Iterable[bytes], segment_size: int, total_size: int, source: str
         ) -> Iterator[bytes | memoryview]:
    """`pieces` of any sizes re-cut into the plaintext segments of a `total_size`-byte stream,
    holding at most one segment; `ValueError` naming `source` when they add up to anything
    but `total_size` (the header would no longer describe them)."""
    changed = f"{source} changed size while it was being sealed"
    buffer = bytearray()
    done = 0  # bytes already yielded in segments
    for piece in pieces:
        view = memoryview(piece)
        while view:
            want = min(segment_size, total_size - done)
            if want <= 0:
                raise ValueError(changed)
            if not buffer and len(view) >= want:  # a whole segment in one piece: no copy
                segment, view = view[:want], view[want:]
            else:
                take = want - len(buffer)
                buffer += view[:take]
                view = view[take:]
                if len(buffer) < want:
                    continue
                segment = memoryview(bytes(buffer))
                buffer.clear()
            done += len(segment)
            yield segment
    if done != total_size or buffer:
        raise ValueError(changed)
    if total_size == 0:
        yield b""


def _sealed_segments(aead: Aead, prefix: bytes, aad: bytes, segment_size: int,
                     total_size: int, pieces: Iterable[bytes], source: str) -> Iterator[bytes]:
    """Seal `pieces` (re-cut into segments, `_cut`) with STREAM nonces, one at a time."""
    last = _segment_count(total_size, segment_size) - 1
    for index, plaintext in enumerate(_cut(pieces, segment_size, total_size, source)):
        yield aead.seal(_segment_nonce(prefix, index, index == last), plaintext, aad)


def _opened_segments(aead: Aead, prefix: bytes, aad: bytes, segments: int, total_size: int,
                     sealed: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """Open STREAM-sealed segments one at a time; `CryptoError` on any tampering, a
    truncated or extended sequence only once it ends."""
    count = total = 0
    for index, ciphertext in enumerate(sealed):
        if index >= segments:
            raise CryptoError()
        plaintext = aead.open(_segment_nonce(prefix, index, index == segments - 1),
                              ciphertext, aad)
        count, total = index + 1, total + len(plaintext)
        yield plaintext
    if count != segments or total != total_size:
        raise CryptoError()


def _blocks(path: Path, size: int) -> Iterator[bytes]:
    """The file at `path` in `size`-byte reads, to its end."""
    with path.open("rb") as source:
        while block := source.read(size):
            yield block


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
    _check_segment_size(segment_size)
    total_size = path.stat().st_size
    segments = _segment_count(total_size, segment_size)
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
    sealed = _sealed_segments(Aead(data_key), prefix, _segment_aad(record_id, owner),
                              segment_size, total_size, _blocks(path, segment_size), str(path))
    return header, sealed


def _check_segment_size(segment_size: int) -> None:
    if not 0 < segment_size < 2**32:
        raise ValueError(f"segment_size must be in 1..2**32-1, got {segment_size}")


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
    return _opened_segments(Aead(data_key), header.nonce_prefix, _segment_aad(record_id, owner),
                            header.segments, header.total_size, segments)


def rewrap_stream(
    keyring: MasterKeyring, header: StreamHeader, *, record_id: str, owner: str
) -> StreamHeader:
    """Re-wrap a stream's data key under the newest master key; no segment is read or changed."""
    data_key = unwrap_data_key(keyring, header, record_id, owner, _STREAM_WRAP_LABEL, header.shape)
    version, wrap_nonce, wrapped_key = wrap_data_key(
        keyring, data_key, record_id, owner, _STREAM_WRAP_LABEL, header.shape
    )
    return replace(header, key_version=version, wrapped_key=wrapped_key, wrap_nonce=wrap_nonce)


class ScratchStream:
    """A payload sealed under a key that exists only in this object (see the module
    docstring): `seal` its pieces as they arrive and put the segments anywhere, then `open`
    them (or `open_file` the file they were appended to) to read it back.

    The segments and nonces are a stored stream's; only the key differs: fresh random bytes
    held here and nowhere else, never wrapped, written or logged, gone with the object. So
    there is no header to keep: nothing else could open the segments anyway, and a process
    that dies leaves only ciphertext nobody can read. A dropped, reordered, altered,
    truncated or extended sequence raises the opaque `CryptoError` when opened.
    """

    def __init__(self, total_size: int, *, segment_size: int = SEGMENT_BYTES) -> None:
        _check_segment_size(segment_size)
        if not 0 <= total_size < 2**64:
            raise ValueError(f"total_size must be in 0..2**64-1, got {total_size}")
        self.total_size, self.segment_size = total_size, segment_size
        self.segments = _segment_count(total_size, segment_size)
        self._aead = Aead(new_key())
        self._prefix = random_bytes(_STREAM_PREFIX_BYTES)
        self._aad = associated_data(_SCRATCH_SEGMENT_LABEL)

    def seal(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """The sealed segments of `pieces` (any sizes, `total_size` bytes in all), lazily:
        at most one segment of plaintext is held; `ValueError` if they add up to anything
        else."""
        return _sealed_segments(self._aead, self._prefix, self._aad, self.segment_size,
                                self.total_size, pieces, "the scratch payload")

    def open(self, sealed: Iterable[bytes | memoryview]) -> Iterator[bytes]:
        """Decrypt `sealed` segment by segment (as `open_stream`: use the output only once
        the loop ends without raising)."""
        return _opened_segments(self._aead, self._prefix, self._aad, self.segments,
                                self.total_size, sealed)

    def open_file(self, fd: int) -> Iterator[bytes]:
        """Decrypt the segments written back to back into the file `fd`, from its start (read
        with `pread`, so the descriptor's offset does not matter)."""
        return self.open(self._read(fd))

    def _read(self, fd: int) -> Iterator[bytes | memoryview]:
        """The file cut at the segments' sealed lengths, read about `_READ_BYTES` at a time;
        a segment the file ends inside comes short (and fails to open), and what is left at
        its end, if anything, comes as one more segment, which `open` refuses."""
        per_read = max(1, _READ_BYTES // (self.segment_size + TAG_BYTES))
        offset = 0
        for first in range(0, self.segments, per_read):
            sizes = [self._plaintext_size(index) + TAG_BYTES
                     for index in range(first, min(first + per_read, self.segments))]
            block = memoryview(_pread_all(fd, sum(sizes), offset))
            offset += sum(sizes)
            for size in sizes:
                yield block[:size]
                block = block[size:]
        if extra := os.pread(fd, 1, offset):
            yield extra

    def _plaintext_size(self, index: int) -> int:
        return min(self.segment_size, self.total_size - index * self.segment_size)

    def __repr__(self) -> str:
        return f"ScratchStream(segments={self.segments}, total_size={self.total_size})"


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file."""
    parts: list[bytes] = []
    while size:
        part = os.pread(fd, size, offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)
