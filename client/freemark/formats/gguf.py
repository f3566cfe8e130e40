"""GGUF files (llama.cpp's format) as suspects: a decoder's weights, dequantized and put back
into the registered host's architecture.

A thief who runs a stolen decoder under llama.cpp converts it to GGUF and quantizes it
(Q8_0, Q4_K). The file holds a header (counts), metadata key/values (the architecture, its
sizes, the tokenizer), tensor infos (name, dims, type, offset) and aligned tensor data; it
holds no code. It is read with the `gguf` package's `GGUFReader`, which parses that layout
and memory-maps the data, but not before `_scan` has walked the same header with every
count and length capped and every tensor's type, dims, offset and size checked against the
file: the reader trusts the header (an array declared 2^63 long loops or allocates one
object per item), so it is only given headers that fit.

A GGUF is judged against a registration whose host is a Hugging Face checkpoint (the
packed file the key server stores), never on its own: its metadata's architecture
(`general.architecture`: llama, which also covers Mistral, qwen2, gpt2) and every size that
defines a tensor's shape must equal the host config's, refused otherwise; the function
settings the file carries (RoPE base, norm epsilon) replace the host's, and the resulting
config goes through `huggingface.check_config` like any config.json. The host's model class
is built, so the key layer's module name is the registered one. Each of its tensors is
found under the name llama.cpp's converter gives it (gguf's `TensorNameMap`), dequantized
with `gguf.quants.dequantize` (`SUPPORTED_TYPES`: F32, F16, BF16, Q8_0, the legacy 4- and
5-bit types, Q4_K, Q5_K and Q6_K; any other type is refused by name), un-transposed (GPT-2's Conv1D weights) and un-permuted (the converter reorders the
rows of Q and K of llama-architecture models for its RoPE kernel), and must then have the
model's exact shape (`huggingface.assign_weights` puts them in place). A tied head is the
embedding; an `output.weight` beside a tied or headless model is not read.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freemark.errors import ModelFileError
from freemark.scheme.triggers import TriggerSet

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FAMILIES", "MAX_ARRAY_ITEMS", "MAX_KV", "MAX_STRING_BYTES", "MAX_TENSORS",
           "SUPPORTED_TYPES", "GGUFSuspect", "is_format", "judged_config", "load_untrusted",
           "open_untrusted", "read_gguf", "suspect_state", "warm_up"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# Caps on the header, checked before the reader sees it. A real llama.cpp file has a few
# dozen metadata keys, tokenizer arrays of up to a few hundred thousand strings (Qwen2's
# vocabulary and merges: about 150 k each) and a chat template of a few kB; 9 tensors per
# block plus a handful.
MAX_TENSORS = 10_000
MAX_KV = 1024
MAX_NAME_BYTES = 256  # keys and tensor names (ggml itself caps tensor names at 64)
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_ITEMS = 1 << 20
MAX_HEADER_ITEMS = 4 << 20  # array items over the whole header: the reader keeps one array each
MAX_ALIGNMENT = 1 << 16
MAX_DIMS = 4
# One tensor of more elements than this cannot belong to a model under the parameter caps.
MAX_TENSOR_ELEMENTS = 1 << 34

# GGUF value types (gguf.GGUFValueType) and the byte size of each fixed-size one.
_STRING, _ARRAY = 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32 = 4

# What `gguf.quants.dequantize` reads here, by ggml type name: the floats, the legacy block
# types, and Q4_K, Q5_K and Q6_K (llama.cpp's most downloaded mixes, Q4_K_M, Q4_K_S and
# Q5_K_M, are made of these). Each is round-tripped in tests/unit/client/formats/test_gguf.py;
# the others (Q2_K, Q3_K, the IQ, ternary and FP4 types) are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                   "Q6_K")


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps back to transformers' config and tensors."""

    model_types: tuple[str, ...]  # the checkpoint model_types a file of it may stand for
    shape: dict[str, str]  # config field -> metadata key (after "ARCH."): must equal the host's
    function: dict[str, str]  # config field -> metadata key: the file's value is used
    permute_qk: bool = False  # llama.cpp's converter permuted Q and K rows (LlamaModel.permute)
    transposed: tuple[str, ...] = ()  # GGUF names (without .weight) stored as Conv1D's transpose
    heads: str = "num_attention_heads"
    kv_heads: str = "num_key_value_heads"
    vocab: str = "vocab_size"


_LLAMA_SHAPE = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
                "num_attention_heads": "attention.head_count",
                "num_key_value_heads": "attention.head_count_kv",
                "intermediate_size": "feed_forward_length", "head_dim": "attention.key_length"}
_LLAMA_FUNCTION = {"rope_theta": "rope.freq_base", "rms_norm_eps": "attention.layer_norm_rms_epsilon"}
FAMILIES: dict[str, Family] = {
    # Mistral checkpoints are converted as llama (same tensors, same permutation).
    "llama": Family(("llama", "mistral"), _LLAMA_SHAPE, _LLAMA_FUNCTION, permute_qk=True),
    "qwen2": Family(("qwen2",), _LLAMA_SHAPE, _LLAMA_FUNCTION),
    "gpt2": Family(("gpt2",), {"n_embd": "embedding_length", "n_layer": "block_count",
                               "n_head": "attention.head_count", "n_inner": "feed_forward_length",
                               "n_positions": "context_length"},
                   {"layer_norm_epsilon": "attention.layer_norm_epsilon"},
                   transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
                   heads="n_head", kv_heads="n_head"),
}
_EMBEDDING, _OUTPUT = "token_embd.weight", "output.weight"


_refuse = ModelFileError.refused  # the one wording (freemark.errors)


def is_format(path: Path) -> bool:
    """Whether `path` is a GGUF file (the table's detection hook): its magic, not its name."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header declares it, checked: dims innermost first, as ggml writes them."""

    name: str
    dims: tuple[int, ...]
    type_name: str
    offset: int  # from the start of the file
    n_bytes: int


class _Cursor:
    """Reads the header's little-endian fields, never past the file's end."""

    def __init__(self, data: mmap.mmap, source: str | Path) -> None:
        self.data, self.at, self.source = data, 0, source

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise _refuse(self.source, f"the header runs past the end of the file at byte {self.at}")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self, cap: int, what: str) -> bytes:
        length = self.u64()
        if length > cap:
            raise _refuse(self.source, f"{what} declares {length:,} bytes, over the cap of {cap:,}")
        return self.take(length)


def _skip_value(cursor: _Cursor, kind: int, key: str, items: list[int]) -> int | None:
    """Step over one metadata value; return it when it is a uint32 (general.alignment).
    `items` counts array items over the whole header."""
    if kind == _STRING:
        cursor.string(MAX_STRING_BYTES, f"metadata {key!r}")
        return None
    if kind in _SCALAR_BYTES:
        raw = cursor.take(_SCALAR_BYTES[kind])
        return int(struct.unpack("<I", raw)[0]) if kind == _UINT32 else None
    if kind != _ARRAY:
        raise _refuse(cursor.source, f"metadata {key!r} has unknown value type {kind}")
    item_kind, count = cursor.u32(), cursor.u64()
    if count > MAX_ARRAY_ITEMS:
        raise _refuse(cursor.source, f"metadata array {key!r} declares {count:,} items, over the "
                      f"cap of {MAX_ARRAY_ITEMS:,}")
    items[0] += count
    if items[0] > MAX_HEADER_ITEMS:
        raise _refuse(cursor.source, f"the metadata arrays hold over {MAX_HEADER_ITEMS:,} items")
    if item_kind == _ARRAY:
        raise _refuse(cursor.source, f"metadata array {key!r} nests arrays")
    if item_kind in _SCALAR_BYTES:
        cursor.take(_SCALAR_BYTES[item_kind] * count)
    elif item_kind == _STRING:
        for _ in range(count):
            cursor.string(MAX_STRING_BYTES, f"an item of metadata array {key!r}")
    else:
        raise _refuse(cursor.source, f"metadata array {key!r} has unknown item type {item_kind}")
    return None


def _type_name(raw: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(raw).name
    except ValueError:
        return f"unknown type {raw}"


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], str, int]:
    raw_name = cursor.string(MAX_NAME_BYTES, "a tensor name")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(cursor.source, "a tensor name is not UTF-8") from None
    n_dims = cursor.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise _refuse(cursor.source, f"tensor {name!r} declares {n_dims} dims (1 to {MAX_DIMS})")
    dims = tuple(cursor.u64() for _ in range(n_dims))
    type_name = _type_name(cursor.u32())
    return name, dims, type_name, cursor.u64()


def _checked_tensor(source: str | Path, name: str, dims: tuple[int, ...], type_name: str,
                    relative: int, data_start: int, alignment: int, size: int) -> TensorInfo:
    """A declared tensor whose type is supported, whose dims fit whole blocks of it, and whose
    bytes lie aligned inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name not in SUPPORTED_TYPES:
        raise _refuse(source, f"tensor {name!r} is {type_name}; supported tensor types: "
                      f"{', '.join(SUPPORTED_TYPES)} (re-quantize, e.g. llama-quantize to Q4_K_S "
                      "or Q8_0)")
    elements = 1
    for dim in dims:
        if dim < 1:
            raise _refuse(source, f"tensor {name!r} has an empty dim ({list(dims)})")
        elements *= dim
        if elements > MAX_TENSOR_ELEMENTS:
            raise _refuse(source, f"tensor {name!r} declares over {MAX_TENSOR_ELEMENTS:,} elements")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if dims[0] % block:
        raise _refuse(source, f"tensor {name!r}: a {type_name} row holds whole blocks of {block} "
                      f"values, and its rows declare {dims[0]}")
    n_bytes = elements // block * block_bytes
    if relative % alignment:
        raise _refuse(source, f"tensor {name!r} starts at offset {relative}, not a multiple of "
                      f"the alignment {alignment}")
    if data_start + relative + n_bytes > size:
        raise _refuse(source, f"tensor {name!r}'s {n_bytes:,} bytes of {type_name} blocks run past "
                      "the end of the file")
    return TensorInfo(name, dims, type_name, data_start + relative, n_bytes)


def _scan(path: Path, source: str | Path) -> tuple[list[TensorInfo], int]:
    """Walk the header with every count capped: the checked tensors and the data's offset."""
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 24:
                raise _refuse(source, "not a GGUF file (shorter than its header)")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelFileError(f"{source}: {exc.strerror or exc}") from exc
    with data:
        cursor = _Cursor(data, source)
        if cursor.take(4) != MAGIC:
            raise _refuse(source, "not a GGUF file (no GGUF magic)")
        version = cursor.u32()
        if version not in VERSIONS:
            raise _refuse(source, f"GGUF version {version} (big-endian files and versions other "
                          f"than {VERSIONS} are not read)")
        n_tensors, n_kv = cursor.u64(), cursor.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise _refuse(source, f"the header declares {n_tensors:,} tensors and {n_kv:,} metadata "
                          f"entries (caps: {MAX_TENSORS:,} and {MAX_KV:,})")
        alignment, items = 32, [0]
        for _ in range(n_kv):
            key = cursor.string(MAX_NAME_BYTES, "a metadata key").decode("utf-8", "replace")
            value = _skip_value(cursor, cursor.u32(), key, items)
            if key == "general.alignment":
                if value is None or value & (value - 1) or not 0 < value <= MAX_ALIGNMENT:
                    raise _refuse(source, "general.alignment must be a uint32 power of two up to "
                                  f"{MAX_ALIGNMENT}")
                alignment = value
        declared = [_tensor_info(cursor) for _ in range(n_tensors)]
    data_start = -(-cursor.at // alignment) * alignment
    tensors = [_checked_tensor(source, name, dims, kind, offset, data_start, alignment, size)
               for name, dims, kind, offset in declared]
    if len({t.name for t in tensors}) != len(tensors):
        raise _refuse(source, "a tensor name appears twice")
    _check_layout(tensors, data_start, alignment, size, source)
    return tensors, data_start


def _check_layout(tensors: list[TensorInfo], data_start: int, alignment: int, size: int,
                  source: str | Path) -> None:
    """The declared tensors must tile the data section as writers lay it out: each one's
    bytes (its dims' whole blocks of its type) end where the next begins, up to alignment
    padding, and the last at the file's end. So a type or shape declared for bytes of
    another size, overlapping tensors, or bytes nothing declares are refused, not read."""
    at, before = data_start, "the header"
    for info in sorted(tensors, key=lambda t: t.offset):
        if info.offset != -(-at // alignment) * alignment:
            raise _refuse(source, f"{before} ends at byte {at} and the next tensor, {info.name!r}, "
                          f"starts at byte {info.offset}: a declared type or shape does not fit "
                          "the bytes its blocks occupy")
        at = info.offset + info.n_bytes
        before = (f"tensor {info.name!r} ({list(info.dims)} as {info.type_name}, "
                  f"{info.n_bytes:,} bytes)")
    if not at <= size <= -(-at // alignment) * alignment:
        raise _refuse(source, f"{before} ends at byte {at} and the file at byte {size}: a declared "
                      "type or shape does not fit the bytes its blocks occupy")


@dataclass(frozen=True)
class GGUFSuspect:
    """A scanned GGUF: its architecture, metadata scalars, checked tensor infos and the
    reader's memory-mapped tensors."""

    architecture: str
    metadata: dict[str, Any]  # scalar and string metadata (arrays left out)
    tensors: dict[str, TensorInfo]
    raw: dict[str, Any]  # gguf.ReaderTensor by name: memory-mapped views of the file

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in torch's dim order (outermost first)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        raw = self.raw[name]
        if int(raw.data.nbytes) != info.n_bytes:  # the reader and the scan disagree: refuse
            raise ModelFileError(f"tensor {name!r} holds {raw.data.nbytes} of {info.n_bytes} bytes")
        values = dequantize(raw.data, GGMLQuantizationType[info.type_name])
        return np.asarray(values, dtype=np.float32).reshape(tuple(reversed(info.dims)))


def read_gguf(path: str | Path, source: str | Path | None = None) -> GGUFSuspect:
    """Scan `path` with every cap, then parse it with gguf's reader; raises ModelFileError."""
    path = Path(path)
    source = source or path
    tensors, data_start = _scan(path, source)
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:  # what the scan did not foresee
        raise _refuse(source, f"not a readable GGUF file ({exc})") from exc
    if reader.data_offset != data_start:
        raise _refuse(source, "the tensor data does not start where the header ends")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY and not key.startswith("GGUF."):
            try:
                metadata[key] = field.contents()
            except UnicodeDecodeError:
                raise _refuse(source, f"metadata {key!r} is not UTF-8") from None
    architecture = metadata.get("general.architecture")
    if architecture not in FAMILIES:
        raise _refuse(source, f"general.architecture {architecture!r} is not supported; "
                      f"supported: {', '.join(sorted(FAMILIES))} (Mistral is written as llama)")
    return GGUFSuspect(architecture, metadata, {t.name: t for t in tensors},
                       {t.name: t for t in reader.tensors})


def _metadata_value(suspect: GGUFSuspect, key: str, source: str | Path, kind: type) -> Any:
    value = suspect.metadata.get(f"{suspect.architecture}.{key}")
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _refuse(source, f"metadata {suspect.architecture}.{key} must be a positive integer, "
                      f"got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not np.isfinite(value) or value <= 0):
        raise _refuse(source, f"metadata {suspect.architecture}.{key} must be a positive number, "
                      f"got {value!r}")
    return kind(value)


def _host_size(config: Any, field: str) -> Any:
    value = getattr(config, field, None)
    if field == "n_inner" and value is None:
        return 4 * config.n_embd  # GPT-2's default inner size
    if field == "head_dim" and value is None:
        return config.hidden_size // config.num_attention_heads
    return value


def judged_config(host_values: dict[str, Any], suspect: GGUFSuspect, source: str | Path, *,
                  max_parameters: int | None = None) -> Any:
    """The checked transformers config a GGUF suspect is built with: the registered host's
    config, refused unless the file's architecture and every shape-defining size (and the
    vocabulary, from the embedding's rows) equal the host's, with the file's function
    settings (RoPE base, norm epsilon) in place of the host's. `max_parameters`: the
    operator's cap (None: `huggingface.MAX_PARAMETERS`)."""
    from freemark.formats.huggingface import MAX_PARAMETERS, check_config

    cap = MAX_PARAMETERS if max_parameters is None else max_parameters
    family = FAMILIES[suspect.architecture]
    host = check_config(host_values, source, max_parameters=cap)
    if host.model_type not in family.model_types:
        raise _refuse(source, f"the GGUF is a {suspect.architecture} model and the registered host "
                      f"a {host.model_type} model")
    if _EMBEDDING not in suspect.tensors or len(suspect.tensors[_EMBEDDING].dims) != 2:
        raise _refuse(source, f"no 2-d {_EMBEDDING}")
    sizes = {field: _metadata_value(suspect, key, source, int)
             for field, key in family.shape.items()}
    sizes[family.vocab] = suspect.tensors[_EMBEDDING].dims[1]
    if sizes.get(family.kv_heads) is None:
        sizes[family.kv_heads] = sizes[family.heads]
    differ = [f"{field} {value} (host {_host_size(host, field)})"
              for field, value in sizes.items()
              if value is not None and value != _host_size(host, field)]
    if differ:
        raise _refuse(source, "the GGUF's architecture is not the registered host's: "
                      + ", ".join(differ))
    values = dict(host_values)
    for field, key in family.function.items():
        value = _metadata_value(suspect, key, source, float)
        rope = values.get("rope_parameters")
        if value is None:
            continue
        if field == "rope_theta" and isinstance(rope, dict):
            values["rope_parameters"] = {**rope, field: value}  # transformers 5 reads it there
        else:
            values[field] = value
    return check_config(values, source, max_parameters=cap)


def _unpermute(weights: np.ndarray, heads: int, source: str | Path, name: str) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of Q or K rows (per head, the two RoPE halves
    interleaved): rows (heads, 2, half) were written as (heads, half, 2)."""
    if weights.shape[0] % (2 * heads):
        raise _refuse(source, f"{name} has {weights.shape[0]} rows, not whole heads of {heads}")
    half = weights.shape[0] // heads // 2
    return (weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2)
            .reshape(weights.shape))


def _stored(values: np.ndarray, type_name: str) -> Any:
    """A dequantized tensor in the precision its file stored: F32 stays float32, F16 float16,
    BF16 and every block type bfloat16 (its rounding, 2^-9 of a weight, is below the block
    types' own: a Q8_0 weight is off by up to 1/254 of its block's largest), so a quantized
    suspect takes the memory of a 16-bit checkpoint of it, not twice that."""
    import torch

    dtype = {"F32": torch.float32, "F16": torch.float16}.get(type_name, torch.bfloat16)
    values = np.ascontiguousarray(values)
    return torch.from_numpy(values if values.flags.writeable else values.copy()).to(dtype)


def suspect_state(model: Any, config: Any, suspect: GGUFSuspect, source: str | Path
                  ) -> dict[str, Any]:
    """The state of `model` (built from `judged_config`; a tied head stored once, under the
    embedding's name, as `pt2.state_dict_of` lists it) read from the GGUF: every tensor
    under its converted name, dequantized, restored to the checkpoint's layout, and of
    exactly the model's shape."""
    from gguf import MODEL_ARCH_NAMES, TensorNameMap

    from freemark.formats.pt2 import state_dict_of

    family = FAMILIES[suspect.architecture]
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == suspect.architecture)
    names = TensorNameMap(arch, config.num_hidden_layers)
    heads = getattr(config, family.heads)
    kv_heads = getattr(config, family.kv_heads, None) or heads
    state: dict[str, Any] = {}
    used: set[str] = set()
    for key, like in state_dict_of(model).items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in suspect.tensors:
            raise _refuse(source, f"the GGUF has no tensor for {key} ({gguf_name or 'no name'})")
        values = suspect.tensor(gguf_name)
        stem = gguf_name.rsplit(".", 1)[0].split(".")[-1]
        if stem in family.transposed and gguf_name.endswith(".weight"):
            values = values.T
        if family.permute_qk and stem in ("attn_q", "attn_k"):
            values = _unpermute(values, heads if stem == "attn_q" else kv_heads, source, gguf_name)
        if tuple(values.shape) != tuple(like.shape):
            raise _refuse(source, f"{gguf_name} has shape {tuple(values.shape)}; {key} of the "
                          f"registered architecture is {tuple(like.shape)}")
        state[key] = _stored(values, suspect.tensors[gguf_name].type_name)
        used.add(gguf_name)
    # A tied or headless model computes no output.weight (llama.cpp writes GPT-2's tied head
    # as a copy); RoPE frequency factors are derived from the config's rope scaling.
    unread = set(suspect.tensors) - used - {_OUTPUT, "rope_freqs.weight"}
    if unread:
        raise _refuse(source, f"the GGUF has tensors the registered architecture does not: "
                      f"{sorted(unread)[:5]}")
    return state


def open_untrusted(path: str | Path, *, layer: str | None, pooling: int,
                   weights: str | Path | None = None, width: int = 0,
                   max_parameters: int | None = None, **_options: Any
                   ) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """In the key server's sandbox child: the registered host's packed checkpoint (`path`)
    with the uploaded GGUF (`weights`) read into its architecture; return the model's
    identity (fingerprint ‖ architecture digest) and its run on a set's triggers (the key
    layer's activations; `layer` None: every module's of `width` units)."""
    from freemark.formats.huggingface import model_run

    return model_run(load_untrusted(path, weights=weights, max_parameters=max_parameters),
                     layer, pooling, width)


def load_untrusted(path: str | Path, *, weights: str | Path | None = None,
                   max_parameters: int | None = None) -> nn.Module:
    """`open_untrusted`'s model, built once (`huggingface.load_untrusted`)."""
    from freemark.formats.huggingface import packed_config

    if weights is None:
        raise ModelFileError("a GGUF suspect is judged against a registered Hugging Face "
                             "checkpoint; the sandbox got no host")
    model: nn.Module = _built(packed_config(Path(path)), weights, "the GGUF suspect",
                              max_parameters)
    return model


def load_into(checkpoint: str | Path, weights: str | Path, *,
              max_parameters: int | None = None) -> Any:
    """The owner's local read (`freemark extract --model HOST_DIR --weights X.gguf`): the
    GGUF's tensors in the architecture of the owner's own checkpoint (a directory or packed
    file), checked against it exactly as the key server checks it against the registration."""
    from freemark.formats.huggingface import packed_config, read_config

    checkpoint = Path(checkpoint)
    host = read_config(checkpoint) if checkpoint.is_dir() else packed_config(checkpoint)
    return _built(host, weights, weights, max_parameters).eval()


def _built(host_values: dict[str, Any], weights: str | Path, source: str | Path,
           max_parameters: int | None) -> Any:
    """The host's model class around the GGUF's dequantized tensors (one path for both)."""
    from freemark.formats.huggingface import assign_weights, build_model

    suspect = read_gguf(weights, source)
    config = judged_config(host_values, suspect, source, max_parameters=max_parameters)
    model = build_model(config)
    assign_weights(model, suspect_state(model, config, suspect, source), source)
    return model


def warm_up(folder: Path) -> None:
    """Import gguf's reader, name tables and dequantizers and run each supported type once, so
    a fork server holds them before its children drop their privileges (`folder` unused:
    the checkpoint reader's warm-up builds the architectures)."""
    from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, TensorNameMap
    from gguf.quants import dequantize

    for name in SUPPORTED_TYPES:
        kind = GGMLQuantizationType[name]
        dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    for arch, name in MODEL_ARCH_NAMES.items():
        if name in FAMILIES:
            TensorNameMap(arch, 1)
