"""Sealed anonymous memory files: plaintext models that a sandbox child reads, never on disk.

Every model a sandbox child reads is in a memfd (`memfd_create`): a registered host opened for
a run (`handlers.hosts`), and every upload (`rpc.uploads`: hashed into one as it arrives
within the spool's memory budget, or decrypted into one from the encrypted disk spool once it
has arrived and checked out). No directory entry, nothing left behind if the server is
killed, gone when the last descriptor closes. Once written (and, for an upload, hashed; for
a host, authenticated), the file is sealed against writes, growth and shrinking (`seal`), so
nothing, neither the server nor the child that maps it through a read-only descriptor, can
change a byte of what was checked: the digest a verdict or receipt names is of the bytes the
child judged.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["create", "filled", "path", "seal", "write_all"]

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def create(name: str) -> int:
    """A new, empty memory file that can be sealed (its descriptor, close-on-exec)."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Append `data` whole (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def seal(fd: int) -> None:
    """Forbid any further write, growth, shrinking or change of seals."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


def path(fd: int) -> Path:
    """The file as a path valid in this process (the sandbox pool opens it read-only)."""
    return Path(f"/proc/self/fd/{fd}")


@contextmanager
def filled(name: str, pieces: Iterable[bytes]) -> Iterator[Path]:
    """`pieces` written into a new memory file, sealed, as a path valid in this process.

    The path is handed out only once `pieces` is exhausted without raising, so a source that
    checks as it goes (an authenticated decryption, a hashed upload) raises before anything
    can read a byte of what failed; the file is closed (and gone) when the block ends.
    """
    fd = create(name)
    try:
        for piece in pieces:
            write_all(fd, piece)
        seal(fd)
        yield path(fd)
    finally:
        os.close(fd)
