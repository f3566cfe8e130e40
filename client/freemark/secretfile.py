"""One way to write a secret file: key bundles, trigger sets, the key server's key files.

`write_private` writes the bytes to a temporary file in the target's directory, created with
``O_CREAT | O_EXCL`` and mode 0600 (never readable by others, not even for an instant, and
whatever the umask), fsyncs it, and moves it into place in one step, then fsyncs the
directory: a reader sees the old file or the new one, and a crash never leaves half a key.
On any failure the temporary file is removed.

A symbolic link at the target is refused rather than replaced: a secret goes where the caller
said, not where a link planted there points. (The final rename would replace a link swapped
in after that check, never write through it.)

The key server uses this module too (the server depends on the library, never the reverse).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

__all__ = ["PRIVATE_MODE", "write_private"]

PRIVATE_MODE = 0o600


def write_private(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> None:
    """Atomically write `data` to `path` with mode 0600.

    An existing file is replaced, unless `exclusive`: then `FileExistsError` if `path` exists,
    decided atomically (two writers racing to create the same file cannot both succeed).
    A symbolic link at `path` raises `OSError` (``ELOOP``). The directory must exist.
    """
    target = Path(path)
    try:
        if stat.S_ISLNK(os.lstat(target).st_mode):
            raise OSError(errno.ELOOP, "refusing to replace a symbolic link", str(target))
    except FileNotFoundError:
        pass
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            # The umask can only remove bits from the 0600 given to open; set exactly 0600.
            os.fchmod(handle.fileno(), PRIVATE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temp, target)  # unlike rename, fails if the target exists
        else:
            os.replace(temp, target)
        _fsync_directory(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
