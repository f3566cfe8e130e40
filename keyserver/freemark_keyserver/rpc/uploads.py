"""Streamed uploads: hashed as they arrive, never held in the server's own memory, checked at
the end; kept in a sealed memory file, or spooled to a private temp file past a memory budget.

Where the bytes go (`spooled`): an upload whose announced size fits what is left of the
spool's memory budget (`--spool-memory-bytes`) is written into an anonymous memory file
(`memfiles`) as it is hashed, and sealed once its size and SHA-256 check out: the sandbox
child maps those very bytes read-only, so what a verdict or receipt names is what was judged,
a plaintext host never rests on disk (RAM is not disk), and there is no file to write back or
clean up (issue 20: a 2.2 GB decoder's upload wrote 2.2 GB to the data dir's disk and read
it back). A larger upload, or one arriving while others hold the budget, goes to the disk
spool instead (0600, in the 0700 data dir, removed when the call ends). The memory budget is
taken by announced sizes when an upload starts and only ever chooses where bytes go: it
refuses nothing.

The spool has a quota over all open uploads, and each principal a share of it, whichever of
the two holds them. An upload
holds the bytes it has received, reserved chunk by chunk before each is written, never its
announced size: a client announcing 2 GiB and trickling holds what it sent, not the disk it
named (issue 18: four such streams held an 8 GiB quota for hours). Past the quota, or past
the principal's share of it (`--spool-principal-share`; one principal, however many streams
it opens, never holds all of it), the chunk is refused SPOOL_FULL and the upload's file
removed; an upload announced larger than a share is refused before any byte. A stream lasts
at most `--max-stream-seconds` (`rpc.calls`), so what is held is also held for a bounded
time. Reservations are released when the file is removed. The spool is emptied when the
server starts: a crash leaves no upload behind (decrypted hosts never come here:
`hosts.host_file` keeps them in a sealed memfd).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from freemark.v1 import keyservice_pb2
from freemark_keyserver import memfiles, metrics
from freemark_keyserver.errors import ErrorCode, ServiceError

log = logging.getLogger("freemark_keyserver")
SHA256_BYTES = 32
SPOOL_RETRY_SECONDS = 10.0  # a hint: uploads in flight finish or stall out in about this long


class Spool:
    """The upload spool directory, its quota, and each principal's share of it."""

    def __init__(self, directory: Path, quota_bytes: int, principal_share: float = 1.0,
                 memory_bytes: int = 0) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self.share_bytes = int(quota_bytes * principal_share)  # what one principal may hold
        self.memory_bytes = memory_bytes  # announced bytes open uploads may keep in memory
        self._in_memory = 0
        self._reserved = 0
        self._held: dict[str, int] = {}  # principal -> bytes its open uploads hold
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

    def held(self, principal: str) -> int:
        """Bytes reserved now by `principal`'s open uploads."""
        with self._lock:
            return self._held.get(principal, 0)

    @property
    def in_memory(self) -> int:
        """Announced bytes of the open uploads kept in memory files now."""
        with self._lock:
            return self._in_memory

    @contextmanager
    def memory(self, size: int) -> Iterator[bool]:
        """Whether an upload announced at `size` bytes goes to a memory file: yes while it
        fits what is left of the memory budget, taken until the block ends; no (the disk
        spool) otherwise."""
        with self._lock:
            fits = self._in_memory + size <= self.memory_bytes
            if fits:
                self._in_memory += size
        try:
            yield fits
        finally:
            if fits:
                with self._lock:
                    self._in_memory -= size

    @contextmanager
    def reserve(self, principal: str) -> Iterator[Reservation]:
        """A reservation for one upload of `principal`: empty at first, grown as bytes arrive
        (`Reservation.grow`), released whole when the block ends."""
        reservation = Reservation(self, principal)
        try:
            yield reservation
        finally:
            with self._lock:
                self._release(principal, reservation.size)

    def _grow(self, principal: str, size: int) -> None:
        """Hold `size` more bytes for `principal`; SPOOL_FULL when they are not free.

        The refusal names sizes, never the spool's path.
        """
        with self._lock:
            held = self._held.get(principal, 0)
            if held + size > self.share_bytes:
                metrics.RATE_LIMITED_TOTAL.labels("spool_share").inc()
                raise ServiceError(
                    ErrorCode.SPOOL_FULL,
                    f"your open uploads hold {held} bytes of the {self.share_bytes}-byte share of "
                    f"the server's upload quota one principal may hold; retry in "
                    f"{SPOOL_RETRY_SECONDS:.0f} s, when fewer of your uploads are open",
                    retry_after=SPOOL_RETRY_SECONDS)
            if self._reserved + size > self.quota_bytes:
                metrics.RATE_LIMITED_TOTAL.labels("spool_quota").inc()
                raise ServiceError(
                    ErrorCode.SPOOL_FULL,
                    f"the server is holding {self._reserved} of its {self.quota_bytes}-byte upload "
                    f"quota and this upload needs {size} more; retry in {SPOOL_RETRY_SECONDS:.0f} s",
                    retry_after=SPOOL_RETRY_SECONDS)
            self._reserved += size
            self._held[principal] = held + size
            metrics.SPOOL_BYTES.set(self._reserved)

    def _release(self, principal: str, size: int) -> None:
        self._reserved -= size
        held = self._held.get(principal, 0) - size
        if held > 0:
            self._held[principal] = held
        else:
            self._held.pop(principal, None)
        metrics.SPOOL_BYTES.set(self._reserved)


class Reservation:
    """The bytes one upload holds in the spool's quota."""

    def __init__(self, spool: Spool, principal: str) -> None:
        self._spool, self._principal = spool, principal
        self.size = 0

    def grow(self, size: int) -> None:
        """Hold `size` more bytes (before they are written), or SPOOL_FULL."""
        self._spool._grow(self._principal, size)
        self.size += size


def check_header(header: keyservice_pb2.UploadHeader, cap: int) -> None:
    """Refuse an upload before reading it when its header is malformed or over the cap."""
    if len(header.sha256) not in (0, SHA256_BYTES):
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "upload header needs the file's 32-byte "
                           "SHA-256, or none and a sha256 part after the last chunk")
    if header.total_size == 0:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "upload header says the file is empty")
    if header.total_size > cap:
        raise ServiceError(ErrorCode.TOO_LARGE,
                           f"{header.total_size} bytes is over the server's upload cap of {cap} bytes")


@contextmanager
def _spool_file(header: keyservice_pb2.UploadHeader, *, cap: int, spool: Spool, principal: str,
                suffix: str) -> Iterator[tuple[int, Path | None, Reservation]]:
    """Where one file's bytes go: (descriptor, None for a memory file or the spool file's
    path, its reservation), after the header's size is checked against the cap and the
    principal's share; the file is closed and removed, and everything it held released,
    when the block ends."""
    check_header(header, cap)
    if header.total_size > spool.share_bytes:
        raise ServiceError(ErrorCode.TOO_LARGE, f"{header.total_size} bytes is over the "
                           f"{spool.share_bytes} bytes one principal may hold in the server's "
                           "upload spool")
    with spool.reserve(principal) as reservation, spool.memory(header.total_size) as in_memory:
        if in_memory:
            fd, path = memfiles.create("freemark-upload" + suffix), None
        else:
            spool.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=spool.directory)
            path = Path(name)
        try:
            yield fd, path, reservation
        finally:
            os.close(fd)
            if path is not None:
                path.unlink(missing_ok=True)


@contextmanager
def spooled(chunks: Iterator[bytes], header: keyservice_pb2.UploadHeader, *, cap: int,
            spool: Spool, principal: str, suffix: str,
            deferred: Callable[[], bytes | None] = lambda: None) -> Iterator[Path]:
    """Write the chunks to a memory file or a 0600 temp file (the module docstring says
    which), hashing them as they are written; yield its path once size and SHA-256 match (a
    memory file sealed first, so no byte can change after it was hashed).

    The SHA-256 is the header's, or, where the header left it empty, the one the stream
    sent after the last chunk (`deferred`, asked once `chunks` is exhausted), which is then
    written into `header`: once checked, the header is complete either way, and what a
    handler binds (a verdict's `suspect_sha256`) is read from it. Each chunk is
    reserved in the spool's quota (and `principal`'s share of it) before it is written. The
    file is removed (and the reservation released) when the block ends, whatever happens: a
    stalled, cut or refused stream raises out of `chunks` and leaves nothing behind.
    """
    with _spool_file(header, cap=cap, spool=spool, principal=principal,
                     suffix=suffix) as (fd, path, reservation):
        _receive(fd, chunks, header, reservation, deferred)
        if path is None:
            memfiles.seal(fd)
        yield memfiles.path(fd) if path is None else path


@contextmanager
def copied(source: int, header: keyservice_pb2.UploadHeader, *, cap: int, spool: Spool,
           principal: str, suffix: str) -> Iterator[Path]:
    """`spooled` for a file the server reads itself (`modelroot`: `source` is its descriptor,
    `header.total_size` its size as the server measured it): the kernel copies it
    (`os.sendfile`, no pass through this process) into a memory file, sealed, or a spool file,
    reserved whole in the quota (a size the server measured, not one a client announced).
    Nothing is hashed here: the caller hashes the sealed copy where it needs the digest
    (`sha256_of`), which is what the sandbox child maps. A file that shrinks while it is
    copied is refused; bytes it gains are not copied."""
    with _spool_file(header, cap=cap, spool=spool, principal=principal,
                     suffix=suffix) as (fd, path, reservation):
        reservation.grow(header.total_size)
        done = 0
        while done < header.total_size:
            sent = os.sendfile(fd, source, done, header.total_size - done)
            if sent == 0:
                raise ServiceError(ErrorCode.UPLOAD_CORRUPT, f"the file changed size while it "
                                   f"was read ({done} of {header.total_size} bytes); try again")
            done += sent
        if path is None:
            memfiles.seal(fd)
        yield memfiles.path(fd) if path is None else path


def sha256_of(path: Path) -> bytes:
    """The SHA-256 of a (sealed) copy, read in large blocks (the hash releases the GIL)."""
    with path.open("rb", buffering=0) as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def _receive(fd: int, chunks: Iterator[bytes], header: keyservice_pb2.UploadHeader,
             reservation: Reservation, deferred: Callable[[], bytes | None]) -> None:
    """Write and hash every chunk into `fd`, then check the size and SHA-256 (`spooled`)."""
    digest = hashlib.sha256()
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > header.total_size:
            raise ServiceError(ErrorCode.UPLOAD_CORRUPT,
                               f"received more than the announced {header.total_size} bytes")
        reservation.grow(len(chunk))
        digest.update(chunk)
        memfiles.write_all(fd, chunk)
    if received != header.total_size:
        raise ServiceError(ErrorCode.UPLOAD_CORRUPT,
                           f"stream ended after {received} of {header.total_size} bytes; re-send")
    trailer = deferred()
    if header.sha256 and trailer is not None:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "the upload's SHA-256 was sent "
                           "twice, in its header and after its chunks; send one")
    expected = header.sha256 or trailer
    if expected is None or len(expected) != SHA256_BYTES:
        raise ServiceError(ErrorCode.UPLOAD_CORRUPT, "the stream ended without the 32-byte "
                           "SHA-256 its upload header deferred to a sha256 part; re-send")
    if digest.digest() != expected:
        raise ServiceError(ErrorCode.UPLOAD_CORRUPT, "SHA-256 of the received bytes does not "
                           "match the header; the file changed or was corrupted in transit")
    header.sha256 = expected
