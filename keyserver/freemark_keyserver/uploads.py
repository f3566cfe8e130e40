"""Streamed uploads: spooled to a private temp file, never held in memory, checked at the end."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freemark.v1 import keyservice_pb2
from freemark_keyserver.errors import ErrorCode, ServiceError

SHA256_BYTES = 32


def check_header(header: keyservice_pb2.UploadHeader, cap: int) -> None:
    """Refuse an upload before reading it when its header is malformed or over the cap."""
    if len(header.sha256) != SHA256_BYTES:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "upload header needs the file's 32-byte SHA-256")
    if header.total_size == 0:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "upload header says the file is empty")
    if header.total_size > cap:
        raise ServiceError(ErrorCode.TOO_LARGE,
                           f"{header.total_size} bytes is over the server's upload cap of {cap} bytes")


@contextmanager
def spooled(chunks: Iterator[bytes], header: keyservice_pb2.UploadHeader, *, cap: int,
            directory: Path, suffix: str) -> Iterator[Path]:
    """Write the chunks to a 0600 temp file; yield its path once size and SHA-256 match.

    The file is removed when the block ends, whatever happens.
    """
    check_header(header, cap)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=directory)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                received += len(chunk)
                if received > header.total_size:
                    raise ServiceError(ErrorCode.UPLOAD_CORRUPT,
                                       f"received more than the announced {header.total_size} bytes")
                digest.update(chunk)
                handle.write(chunk)
        if received != header.total_size:
            raise ServiceError(ErrorCode.UPLOAD_CORRUPT,
                               f"stream ended after {received} of {header.total_size} bytes; re-send")
        if digest.digest() != header.sha256:
            raise ServiceError(ErrorCode.UPLOAD_CORRUPT, "SHA-256 of the received bytes does not "
                               "match the header; the file changed or was corrupted in transit")
        yield path
    finally:
        path.unlink(missing_ok=True)
