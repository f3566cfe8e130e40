"""The arrays of an uncompressed `.npz` archive held in memory, read without copying them.

An output key is an `.npz` (`freemark.blackbox.key`), and the key server seals it inside
another (`freemark_keyserver.handlers.outputs`), so every VerifyEndpoint opens two archives
of about 25 members and 2 MB. `np.load` reads each member through zipfile (the bytes copied
in 256 KiB chunks under a CRC) and parses each member's `.npy` header with
`ast.literal_eval`: 4-11 ms per Verify, before the first query could leave. Here zipfile
reads only the archive's directory; each member is found through its local header and
becomes a read-only view of the caller's bytes (`np.frombuffer`), and each distinct header
text is parsed once, by numpy's own reader (a key's layout repeats from one Verify to the
next, and a header holds only a dtype and a shape).

What `np.load(..., allow_pickle=False)` refuses is refused here too (object dtypes), and
more: compressed, encrypted or duplicated members, a member whose local header disagrees
with the directory, or whose data is not exactly its header's array. The CRC is not
checked: it guards against a damaged disk, not an attacker, and every archive read here is
either authenticated (an AEAD opened the key file or the sealed registration) or checked
field by field after (`decode_output_key`).
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zipfile
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError

__all__ = ["read_npz"]

# A zip local file header (zipfile's `structFileHeader`): signature, versions, flags,
# method, time, date, CRC, sizes, then the lengths of the name and the extra field.
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
# The .npy header's length field: two bytes in format 1.0, four in 2.0 (3.0 differs from
# 2.0 only in its header's text encoding, which np.savez uses for unicode field names alone).
_HEADER_LENGTH = {1: struct.Struct("<H"), 2: struct.Struct("<I")}


@functools.lru_cache(maxsize=64)
def _header(major: int, text: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a .npy header, parsed by numpy's reader."""
    prefix = _NPY_MAGIC + bytes((major, 0)) + _HEADER_LENGTH[major].pack(len(text)) + text
    stream = io.BytesIO(prefix)
    np.lib.format.read_magic(stream)
    if major == 1:
        return np.lib.format.read_array_header_1_0(stream)  # type: ignore[no-any-return]
    return np.lib.format.read_array_header_2_0(stream)  # type: ignore[no-any-return]


def _array(member: memoryview, name: str) -> np.ndarray:
    """One .npy member's array, a read-only view of `member`."""
    if bytes(member[:6]) != _NPY_MAGIC or len(member) < 10 or member[6] not in _HEADER_LENGTH:
        raise InvalidInputError(f"member {name!r} is not a .npy array of format 1.0 or 2.0")
    length = _HEADER_LENGTH[member[6]]
    size = length.unpack_from(member, 8)[0]
    start = 8 + length.size + size
    if start > len(member):
        raise InvalidInputError(f"member {name!r}: its .npy header runs past its end")
    try:
        shape, fortran, dtype = _header(member[6], bytes(member[8 + length.size:start]))
    except ValueError as exc:
        raise InvalidInputError(f"member {name!r}: malformed .npy header ({exc})") from exc
    if dtype.hasobject:
        raise InvalidInputError(f"member {name!r} holds Python objects; only plain arrays are "
                                "read (nothing in an archive may run code)")
    count = math.prod(shape)
    if len(member) - start != count * dtype.itemsize:
        raise InvalidInputError(f"member {name!r} holds {len(member) - start} bytes of data, not "
                                f"the {count * dtype.itemsize} its header says")
    flat = np.frombuffer(member, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C")


class _Reader(io.RawIOBase):
    """A seekable, read-only file over a buffer (io.BytesIO would copy a memoryview), for
    zipfile to read the archive's directory from."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._at = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the archive")
        self._at = base + offset
        return self._at

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), len(self._view) - self._at))
        buffer[:count] = self._view[self._at:self._at + count]
        self._at += count
        return count


def read_npz(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Every array of an uncompressed `.npz` (as `np.savez` writes it), by name, each a
    read-only view of `data`; InvalidInputError for anything else (module docstring)."""
    view = memoryview(data).cast("B")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(_Reader(view)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInputError(f"not an .npz archive ({exc})") from exc
    for info in members:
        name = info.filename
        if not name.endswith(".npy") or name[:-4] in arrays:
            raise InvalidInputError(f"member {name!r} is not one .npy array of a distinct name")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or \
                info.compress_size != info.file_size:
            raise InvalidInputError(f"member {name!r} is compressed or encrypted; only stored "
                                    "members are read")
        at = info.header_offset
        if at < 0 or at + _LOCAL.size > len(view):
            raise InvalidInputError(f"member {name!r} lies outside the archive")
        fields = _LOCAL.unpack_from(view, at)
        signature, name_length, extra_length = fields[0], fields[-2], fields[-1]
        start = at + _LOCAL.size + name_length + extra_length
        stored = bytes(view[at + _LOCAL.size:at + _LOCAL.size + name_length])
        if signature != _LOCAL_SIGNATURE or stored != info.orig_filename.encode(
                "utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise InvalidInputError(f"member {name!r}: its local header disagrees with the "
                                    "archive's directory")
        if start + info.file_size > len(view):
            raise InvalidInputError(f"member {name!r} runs past the end of the archive")
        arrays[name[:-4]] = _array(view[start:start + info.file_size], name)
    return arrays
