"""Models the key server reads itself: named by a path under the operator's model root.

A hub that mirrors the models it hosts (read-only, on the key server's machine) need not send
a 2.2 GB decoder (or a 140 GB one) through gRPC for every Register or Verify: the request
names the file (`UploadHeader.model_path`), the server opens it under `serve --model-root`,
and the kernel copies it (`uploads.copied`) into a sealed memory file (always: the file is
public and on disk in the clear already), counted in the same quota, refused over the same cap. A verdict names the
SHA-256 of that copy, hashed while the sandbox child maps the same sealed bytes: the original
may change or vanish a moment later without changing what was judged (issue 20).

Confinement (`open_named`): the name is relative, plain names joined by "/", never "..",
"." or empty; each part is opened from its parent's descriptor with O_NOFOLLOW, so a
symbolic link anywhere on the way, inside the root or out of it, is refused rather than
followed, and the last part must be a regular file (a FIFO or device is never read: opened
non-blocking, refused by its type). Refusals name the requested path only, never the
root's place on the server's disk, and nothing is logged or appended for them. The root is
the operator's: every principal who may Register or Verify may have any file under it read
(and judged) by name, so it holds public models only.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from freemark_keyserver.errors import ErrorCode, ServiceError

__all__ = ["MAX_NAME_CHARS", "open_named"]

MAX_NAME_CHARS = 1024  # a path under the root, in characters


def _refuse(code: ErrorCode, name: str, why: str) -> ServiceError:
    return ServiceError(code, f"model_path {name!r}: {why}")


def _parts(name: str) -> list[str]:
    """The plain names of a model path, or INVALID_ARGUMENT naming what is wrong."""
    if not name or len(name) > MAX_NAME_CHARS or "\0" in name:
        raise _refuse(ErrorCode.MALFORMED_REQUEST, name[:MAX_NAME_CHARS],
                      f"a model path is 1 to {MAX_NAME_CHARS} characters without NUL")
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise _refuse(ErrorCode.MALFORMED_REQUEST, name, "name a file under the server's model "
                      "root by a relative path of plain names joined by '/' (no '..', '.', "
                      "empty or absolute part)")
    return parts


def open_named(root: Path | None, name: str) -> int:
    """A read-only descriptor of the regular file `name` under `root`, never through a
    symbolic link; refuses with the status the proto names (`UploadHeader.model_path`)."""
    parts = _parts(name)
    if root is None:
        raise _refuse(ErrorCode.PERMISSION_DENIED, name, "this key server reads no models by "
                      "path (its operator set no --model-root); upload the file instead")
    try:
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ServiceError(ErrorCode.INTERNAL, "the server's model root cannot be opened") from exc
    try:
        for number, part in enumerate(parts):
            last = number == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (
                os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                fd = os.open(part, flags, dir_fd=directory)
            except OSError as exc:
                raise _open_refusal(exc, name, "/".join(parts[:number + 1]),
                                    _is_link(part, directory)) from exc
            os.close(directory)
            directory = fd
        if not stat.S_ISREG(os.fstat(directory).st_mode):
            raise _refuse(ErrorCode.MALFORMED_REQUEST, name, "not a regular file; name a model "
                          "file (.pt2, packed .safetensors, .onnx, .gguf)")
        os.set_blocking(directory, True)
        return directory
    except BaseException:
        os.close(directory)
        raise


def _is_link(part: str, directory: int) -> bool:
    """Whether `part` of `directory` is a symbolic link (O_NOFOLLOW says ELOOP for a last
    part, ENOTDIR with O_DIRECTORY, which a plain file says too)."""
    try:
        return stat.S_ISLNK(os.lstat(part, dir_fd=directory).st_mode)
    except OSError:
        return False


def _open_refusal(exc: OSError, name: str, reached: str, link: bool) -> ServiceError:
    """The refusal for a part of `name` that could not be opened (`reached`: the path up to
    and including it; `link`: it is a symbolic link)."""
    if link or exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
        return _refuse(ErrorCode.PERMISSION_DENIED, name, f"{reached!r} is a symbolic link, and "
                       "the server follows none under its model root; name the file itself")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return _refuse(ErrorCode.NOT_FOUND, name, f"{reached!r} does not exist under the "
                       "server's model root (or is not a directory); check the name")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _refuse(ErrorCode.PERMISSION_DENIED, name, f"the server may not read {reached!r}")
    return _refuse(ErrorCode.MALFORMED_REQUEST, name, f"{reached!r} cannot be opened "
                   f"({os.strerror(exc.errno or 0)})")
