"""Sealed host blobs as files in one directory beside a SQLite database.

A registered host is gigabytes of AES-GCM segments (`crypto.seal_stream`). Written as rows of
SQLite's `host_blobs` table, every byte goes to disk twice (the write-ahead log, then the
checkpoint into the database file) with a commit every few megabytes: 22 s of a 1.1 B-parameter
Register's 60 s (issue 20). One file per blob goes to disk once: the same sealed segments, each
framed by its length (a big-endian u32), nothing else. Nothing here ever sees plaintext; the
stream header that opens a blob (its wrapped data key) stays in the database, so a blob file
alone, or a blob file copied under another registration's name, opens nothing.

Kill -9 safety is the table's: a blob is written under a temporary name, fsynced, linked to its
final name (which fails if the id already has one) and the directory fsynced before `put`
returns, so before the registration that refers to it can commit. A writer killed half-way
leaves a temporary file, and a registration that never committed leaves a blob no row refers
to; the store collects both once they are older than its grace period (`ids` gives each file's
age; a blob's is set from the store's clock).

SQLite only: a SQLite database is one file served by one process on one machine, so the
directory beside it is as available as the database. PostgreSQL replicas share their database
over the network and not a directory, so their blobs stay in the table, where every replica
reads them.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from freemark_keyserver.store.errors import DuplicateError

__all__ = ["BlobFiles"]

_FRAME = struct.Struct(">I")  # each segment's length, before its bytes
_SUFFIX = ".blob"
_PARTIAL = ".partial-"  # prefix of a blob being written (never a hex id's first characters)


class BlobFiles:
    """Blob files in `directory` (created 0700), named by the hex of their id's UTF-8, so
    that no id can name a path outside it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)

    def _path(self, blob_id: str) -> Path:
        return self.directory / (blob_id.encode().hex() + _SUFFIX)

    def put(self, blob_id: str, segments: Iterable[bytes], *, written_at: int) -> int:
        """Write the segments as `blob_id`'s blob, durably, and return how many there were;
        `written_at` (unix microseconds) becomes the file's age. `DuplicateError` if the id
        has a blob already; a source that raises leaves nothing behind."""
        final = self._path(blob_id)
        if final.exists():
            raise DuplicateError(f"host blob {blob_id!r} already exists")
        partial = self.directory / f"{_PARTIAL}{secrets.token_hex(8)}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            count = 0
            with os.fdopen(fd, "wb", buffering=0) as handle:
                for segment in segments:
                    handle.write(_FRAME.pack(len(segment)))
                    handle.write(segment)
                    count += 1
                os.fsync(handle.fileno())
            os.utime(partial, ns=(written_at * 1000, written_at * 1000))
            try:
                os.link(partial, final)  # atomic, and refuses an existing name
            except FileExistsError:
                raise DuplicateError(f"host blob {blob_id!r} already exists") from None
            _fsync_directory(self.directory)
            return count
        finally:
            partial.unlink(missing_ok=True)

    def read(self, blob_id: str) -> Iterator[bytes] | None:
        """The blob's segments in order, read one at a time as the iterator is consumed;
        None if the id has no blob file."""
        try:
            handle = self._path(blob_id).open("rb", buffering=0)  # nothing read ahead
        except FileNotFoundError:
            return None
        return _frames(handle)

    def count(self, blob_id: str) -> int | None:
        """How many segments the blob holds (its frame headers only); None if it has none.
        A frame cut short does not count."""
        try:
            handle = self._path(blob_id).open("rb")
        except FileNotFoundError:
            return None
        with handle:
            size, offset, count = os.fstat(handle.fileno()).st_size, 0, 0
            while offset + _FRAME.size <= size:
                handle.seek(offset)
                (length,) = _FRAME.unpack(handle.read(_FRAME.size))
                offset += _FRAME.size + length
                if offset > size:
                    break
                count += 1
            return count

    def ids(self) -> Iterator[tuple[str | None, Path, int]]:
        """Every file here as (blob id, or None for a partial write; path; age in unix
        microseconds)."""
        for path in self.directory.iterdir():
            name = path.name
            blob_id: str | None = None
            if name.endswith(_SUFFIX):
                try:
                    blob_id = bytes.fromhex(name[: -len(_SUFFIX)]).decode()
                except ValueError:
                    continue
            elif not name.startswith(_PARTIAL):
                continue
            try:
                age = path.stat().st_mtime_ns // 1000
            except FileNotFoundError:
                continue
            yield blob_id, path, age


def _frames(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while header := handle.read(_FRAME.size):
            if len(header) != _FRAME.size:
                return  # a cut frame: the stream's own checks refuse what is missing
            (length,) = _FRAME.unpack(header)
            segment = handle.read(length)
            if len(segment) != length:
                return
            yield segment


def _fsync_directory(directory: Path) -> None:
    """Make a new name in `directory` durable (the file's own fsync does not cover it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
