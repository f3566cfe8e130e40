"""`read_npz`: what np.savez writes, read back as views of the caller's bytes; every other
archive refused as InvalidInputError, never read past its end or unpickled."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from freemark.blackbox.archive import read_npz
from freemark.errors import InvalidInputError

ARRAYS = {
    "queries": np.random.default_rng(0).random((5, 1, 4, 4), dtype=np.float32),
    "labels": np.arange(7, dtype=np.int64),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    "scalar": np.asarray(3, dtype=np.int64),
    "empty": np.zeros((0, 3), dtype=np.uint8),
    "text": np.frombuffer(b"owner@example.com", dtype=np.uint8),
}


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_it_reads_what_np_savez_writes_as_views_of_the_bytes() -> None:
    data = _npz(**ARRAYS)
    arrays = read_npz(data)
    assert sorted(arrays) == sorted(ARRAYS)
    for name, expected in ARRAYS.items():
        got = arrays[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
        assert not got.flags.writeable, name  # a view of immutable bytes, never a copy
    assert np.shares_memory(arrays["queries"], np.frombuffer(data, dtype=np.uint8))


def test_it_reads_an_archive_inside_a_larger_buffer() -> None:
    """The key server reads its sealed form after a magic line, and the key inside it."""
    inner = _npz(labels=ARRAYS["labels"])
    outer = b"magic\n" + _npz(key=np.frombuffer(inner, dtype=np.uint8))
    key = read_npz(memoryview(outer)[len(b"magic\n"):])["key"]
    np.testing.assert_array_equal(read_npz(memoryview(key))["labels"], ARRAYS["labels"])


def _refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        read_npz(data)


def test_compressed_and_pickled_members_are_refused() -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=ARRAYS["labels"])
    _refused(buffer.getvalue(), "compressed")
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=True, objects=np.array([{"a": 1}, None], dtype=object))
    _refused(buffer.getvalue(), "Python objects")


def test_what_is_not_a_plain_npz_is_refused() -> None:
    _refused(b"not a zip at all", "not an .npz")
    data = _npz(labels=ARRAYS["labels"])
    _refused(data[: len(data) // 2], "not an .npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    _refused(buffer.getvalue(), "not one .npy array")
    npy = io.BytesIO()
    np.save(npy, ARRAYS["labels"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.npy", npy.getvalue())
        with pytest.warns(UserWarning, match="Duplicate"):  # which one np.load reads is zipfile's
            archive.writestr("a.npy", npy.getvalue())
    _refused(buffer.getvalue(), "distinct name")


def test_a_member_that_disagrees_with_its_headers_is_refused() -> None:
    data = bytearray(_npz(labels=ARRAYS["labels"]))
    at = data.index(b"PK\x03\x04")
    name = at + 30
    renamed = bytes(data[:name]) + b"x" + bytes(data[name + 1:])  # local name != directory's
    _refused(renamed, "local header disagrees")
    header = data.index(b"'shape': (7,)")
    longer = bytes(data[:header]) + b"'shape': (9,)" + bytes(data[header + 13:])
    _refused(longer, "not the 72 its header says")
    npy = data.index(b"\x93NUMPY")
    broken = bytes(data[:npy + 8]) + struct.pack("<H", 0xFFFF) + bytes(data[npy + 10:])
    _refused(broken, "runs past its end")
