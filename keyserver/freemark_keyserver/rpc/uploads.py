"""Streamed uploads: spooled to a private temp file, never held in memory, checked at the end.

The spool has a quota over all open uploads: an upload reserves its announced size before
its first byte is written (so a client cannot announce small and send large, nor hold more
disk than the operator allows by stalling many uploads), and releases it when its file is
removed. The spool is emptied when the server starts: a crash leaves no upload behind
(decrypted hosts never come here: `hosts.host_file` keeps them in a sealed memfd).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freemark.v1 import keyservice_pb2
from freemark_keyserver import metrics
from freemark_keyserver.errors import ErrorCode, ServiceError

log = logging.getLogger("freemark_keyserver")
SHA256_BYTES = 32
SPOOL_RETRY_SECONDS = 10.0  # a hint: uploads in flight finish or stall out in about this long


class Spool:
    """The upload spool directory and its quota (bytes reserved by open uploads)."""

    def __init__(self, directory: Path, quota_bytes: int) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self._reserved = 0
        self._lock = threading.Lock()

    def clear(self) -> int:
        """Create the directory (0700) and delete everything in it; returns how many files.

        Called at start-up, before any call is served: whatever is there was left by a
        process that died mid-upload or mid-verify.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = 0
        for entry in self.directory.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d file(s) a previous run left in the upload spool", removed)
        return removed

    @property
    def reserved(self) -> int:
        """Bytes reserved now by open uploads."""
        with self._lock:
            return self._reserved

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        """Hold `size` bytes of the quota for the block; SPOOL_FULL when they are not free.

        The refusal names sizes, never the spool's path.
        """
        with self._lock:
            if self._reserved + size > self.quota_bytes:
                metrics.RATE_LIMITED_TOTAL.labels("spool_quota").inc()
                raise ServiceError(
                    ErrorCode.SPOOL_FULL,
                    f"the server is holding {self._reserved} of its {self.quota_bytes}-byte upload "
                    f"quota and this upload needs {size}; retry in {SPOOL_RETRY_SECONDS:.0f} s",
                    retry_after=SPOOL_RETRY_SECONDS)
            self._reserved += size
            metrics.SPOOL_BYTES.set(self._reserved)
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= size
                metrics.SPOOL_BYTES.set(self._reserved)


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
            spool: Spool, suffix: str) -> Iterator[Path]:
    """Write the chunks to a 0600 temp file; yield its path once size and SHA-256 match.

    The announced size is reserved in the spool's quota first. The file is removed (and the
    reservation released) when the block ends, whatever happens: a stalled or cut stream
    raises out of `chunks` and leaves nothing behind.
    """
    check_header(header, cap)
    with spool.reserve(header.total_size):
        spool.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=spool.directory)
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
