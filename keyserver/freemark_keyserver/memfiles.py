"""Sealed anonymous memory files: plaintext models that a sandbox child reads, never on disk.

A registered host opened for a run (`handlers.hosts`) and an upload that fits the spool's
memory budget (`rpc.uploads`) are written into a memfd (`memfd_create`): no directory entry,
nothing left behind if the server is killed, gone when the last descriptor closes. Once
written (and, for an upload, hashed; for a host, authenticated), the file is sealed against
writes, growth and shrinking (`seal`), so nothing, neither the server nor the child that maps
it through a read-only descriptor, can change a byte of what was checked: the digest a
verdict or receipt names is of the bytes the child judged.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["create", "path", "seal", "write_all"]

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
