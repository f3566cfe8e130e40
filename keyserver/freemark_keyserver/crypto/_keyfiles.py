"""Key files on disk: read only if no one else may, created once and race-safe.

Private. Writing goes through the library's `freemark.secretfile.write_private`, the one
writer of secret files, so key files are 0600 from their first byte and replaced atomically.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from freemark.secretfile import write_private

__all__ = ["load_or_create", "read_secret_file", "write_secret_file"]


def read_secret_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others may access."""
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file")
        if mode & 0o077:
            raise ValueError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"it holds key material: run `chmod 600 {path}`"
            )
        return handle.read()


def write_secret_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """`write_private`, creating the key directory (0700) first if it is missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, data, exclusive=exclusive)


def load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """Return the key file's bytes, creating it from `make()` if absent (race-safe)."""
    try:
        return read_secret_file(path)
    except FileNotFoundError:
        pass
    data = make()
    try:
        write_secret_file(path, data, exclusive=True)
    except FileExistsError:  # another process created it first: use theirs
        return read_secret_file(path)
    return data
