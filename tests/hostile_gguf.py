"""Builders for hostile GGUF files, made fresh in a test's tmp_path (tests/hostile_models.py
does the same for `.pt2` programs).

A GGUF header is counts and lengths the reader trusts: each builder here declares one of
them absurdly (a tensor or key/value count of 2^63, a string or array length past any file,
dims whose blocks do not fit the bytes, a type nothing should read) in an otherwise
well-formed file, or edits one field of a real converted file in place. Each must be
refused before anything is allocated for it. The unit tests (the reader) and the key
server's integration tests (Verify) use the same builders.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAGIC, VERSION = b"GGUF", 3
STRING, ARRAY, UINT8, UINT32 = 8, 9, 0, 4


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv_string(key: str, value: str) -> bytes:
    return _string(key.encode()) + struct.pack("<I", STRING) + _string(value.encode())


def raw_gguf(path: Path, *, n_tensors: int = 0, n_kv: int | None = None,
             entries: tuple[bytes, ...] = (), tail: bytes = b"") -> Path:
    """A GGUF of `entries` (raw key/values) whose header declares `n_tensors` and `n_kv`
    (default: the entries' count), followed by `tail`."""
    entries = (_kv_string("general.architecture", "llama"), *entries)
    count = len(entries) if n_kv is None else n_kv
    path.write_bytes(MAGIC + struct.pack("<IQQ", VERSION, n_tensors, count) + b"".join(entries)
                     + tail)
    return path


def tensor_count_bomb(path: Path) -> Path:
    """A 40-byte file declaring 2^63 tensors."""
    return raw_gguf(path, n_tensors=1 << 63)


def kv_count_bomb(path: Path) -> Path:
    """A header declaring 2^63 - 1 metadata entries."""
    return raw_gguf(path, n_kv=(1 << 63) - 1)


def string_bomb(path: Path) -> Path:
    """A metadata string declaring 2^62 bytes."""
    entry = _string(b"general.name") + struct.pack("<IQ", STRING, 1 << 62) + b"x" * 64
    return raw_gguf(path, entries=(entry,))


def array_bomb(path: Path) -> Path:
    """A metadata array of uint8 declaring 2^40 items (the reader makes one array per item)."""
    entry = _string(b"tokenizer.ggml.scores") + struct.pack("<IIQ", ARRAY, UINT8, 1 << 40)
    return raw_gguf(path, entries=(entry,), tail=b"\0" * 1024)


def string_array_bomb(path: Path) -> Path:
    """A tokenizer array of 2^21 empty strings: each item small, the count over the cap."""
    count = 1 << 21
    entry = (_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, count)
             + struct.pack("<Q", 0) * count)
    return raw_gguf(path, entries=(entry,))


def _tensor_infos(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset of its type field, offset of its dims) in a real GGUF."""
    from gguf import GGUFReader

    out = {}
    for tensor in GGUFReader(path).tensors:
        _, name, n_dims, _, _, _ = tensor.field.parts
        dims_at = tensor.field.offset + 8 + len(name) + 4
        out[tensor.name] = (dims_at + 8 * int(n_dims[0]), dims_at)
    return out


def _edit(src: Path, dst: Path, edit: Callable[[bytearray, dict[str, tuple[int, int]]], None]
          ) -> Path:
    data = bytearray(src.read_bytes())
    edit(data, _tensor_infos(src))
    dst.write_bytes(bytes(data))
    return dst


def retyped(src: Path, dst: Path, tensor: str, type_name: str) -> Path:
    """`src` with one tensor's declared type changed to `type_name` (its bytes unchanged):
    a misdeclared quantization block."""
    from gguf import GGMLQuantizationType

    def edit(data: bytearray, infos: dict[str, tuple[int, int]]) -> None:
        struct.pack_into("<I", data, infos[tensor][0], GGMLQuantizationType[type_name].value)
    return _edit(src, dst, edit)


def redimensioned(src: Path, dst: Path, tensor: str, dims: tuple[int, ...]) -> Path:
    """`src` with one tensor's leading dims declared as `dims` (its bytes unchanged)."""
    def edit(data: bytearray, infos: dict[str, tuple[int, int]]) -> None:
        for i, dim in enumerate(dims):
            struct.pack_into("<Q", data, infos[tensor][1] + 8 * i, dim)
    return _edit(src, dst, edit)


def unsupported_type(src: Path, dst: Path, tensor: str) -> Path:
    """`src` rewritten with one 2-d tensor stored as Q3_K (well-formed, not a type freemark
    reads): random bytes of the right size."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(key, field.contents(), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(0)
    for item in reader.tensors:
        shape = tuple(int(d) for d in reversed(item.shape.tolist()))
        if item.name == tensor:
            kind = gguf.GGMLQuantizationType.Q3_K
            nbytes = gguf.quants.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor(item.name, rng.integers(0, 255, nbytes, dtype=np.uint8),
                              raw_dtype=kind)
        else:
            writer.add_tensor(item.name, np.array(item.data), raw_dtype=item.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def other_architecture(src: Path, dst: Path, architecture: str = "bloom") -> Path:
    """`src` with general.architecture rewritten in place (same length keeps offsets)."""
    data = src.read_bytes()
    key = _string(b"general.architecture") + struct.pack("<I", STRING)
    at = data.index(key) + len(key)
    length = struct.unpack_from("<Q", data, at)[0]
    old = data[at + 8:at + 8 + length]
    new = architecture.encode()
    assert len(new) == len(old), "same length, same offsets"
    dst.write_bytes(data[:at + 8] + new + data[at + 8 + length:])
    return dst
