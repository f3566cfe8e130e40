"""The Open Inference Protocol v2 REST messages, read strictly: metadata, infer request, reply.

Pure functions over bytes and arrays (no I/O), so each refusal is testable on its own. The
endpoint is untrusted: a body is parsed with NaN and Infinity refused, every field a verdict
reads is type-checked, and a reply must be exactly what was asked: the model that was named,
the output that was requested, one answer per input, the datatype and shape the metadata
declared. What a verdict reads is told from the metadata alone (the reply must then agree):
an integer output with one value per input is top-1 labels, a floating-point output of shape
[n, C] is scores. Protocol: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from freemark.endpoint.transport import excerpt
from freemark.errors import EndpointResponseError

__all__ = ["DATATYPES", "Kind", "ModelMetadata", "TensorSpec", "decode_infer", "encode_infer",
           "parse_metadata"]

Kind = Literal["labels", "scores"]

# OIP v2 tensor datatypes and their numpy dtypes (BYTES is not a tensor a verdict reads).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_INTEGER = {k for k, v in DATATYPES.items() if v.kind in "iu"}
_FLOAT = {k for k, v in DATATYPES.items() if v.kind == "f"}
_MAX_NAME = 256
_MAX_RANK = 8


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the metadata declares it; -1 in `shape` is a variable size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """`GET /v2/models/{name}[/versions/{v}]`, checked; `kind` and `output` are what a verdict
    reads, told from the declared output (see the module docstring)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kind: Kind
    output: TensorSpec

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]


def _refuse(where: str, why: str) -> EndpointResponseError:
    return EndpointResponseError(f"{where}: {why}")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_json(body: bytes, where: str) -> dict[str, Any]:
    """The body as a JSON object; NaN, Infinity, bad UTF-8 and absurd nesting are refused."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _refuse(where, f"the body is not valid JSON ({excerpt(str(e), 80)}); starts "
                             f"{excerpt(body[:60], 60)}") from None
    if not isinstance(value, dict):
        raise _refuse(where, "the body is not a JSON object")
    return value


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if not required and value in (None, ""):
        return ""
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise _refuse(where, f"field {key!r} is missing or not a short string")
    return value


def _shape(value: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_RANK or not all(
            type(d) is int and d >= -1 for d in value):
        raise _refuse(where, f"{what} has no valid shape ({excerpt(json.dumps(value), 60)})")
    return tuple(value)


def _spec(value: Any, where: str, what: str) -> TensorSpec:
    if not isinstance(value, dict):
        raise _refuse(where, f"{what} is not an object")
    name = _string(value, "name", where)
    datatype = _string(value, "datatype", where)
    return TensorSpec(name, datatype, _shape(value.get("shape"), where, f"{what} {name!r}"))


def _specs(meta: dict[str, Any], key: str, where: str) -> tuple[TensorSpec, ...]:
    value = meta.get(key)
    if not isinstance(value, list) or not 0 < len(value) <= 64:
        raise _refuse(where, f"the metadata declares no {key} (an Open Inference Protocol "
                             "server lists each tensor's name, datatype and shape)")
    return tuple(_spec(v, where, key[:-1]) for v in value)


def _kind(spec: TensorSpec) -> Kind | None:
    if spec.datatype in _INTEGER and len(spec.shape) in (1, 2) and spec.shape[1:] in ((), (1,)):
        return "labels"
    if spec.datatype in _FLOAT and len(spec.shape) == 2 and spec.shape[1] != 1:
        return "scores"
    return None


def parse_metadata(body: bytes, *, model: str, output: str | None, where: str) -> ModelMetadata:
    """The checked metadata of `model`; `output` names the output to read when several exist."""
    meta = load_json(body, where)
    name = _string(meta, "name", where)
    if name != model:
        raise _refuse(where, f"the metadata is for model {excerpt(name, 60)}, not {model!r}")
    versions = meta.get("versions", [])
    if not isinstance(versions, list) or not all(isinstance(v, str) and len(v) <= _MAX_NAME
                                                 for v in versions):
        raise _refuse(where, "field 'versions' is not a list of strings")
    inputs, outputs = _specs(meta, "inputs", where), _specs(meta, "outputs", where)
    if len(inputs) != 1:
        raise _refuse(where, f"model {model!r} takes {len(inputs)} inputs; a key's queries are "
                             "one tensor, so only single-input models can be verified")
    chosen = [o for o in outputs if output is None or o.name == output]
    if output is not None and len(chosen) != 1:
        raise _refuse(where, f"model {model!r} has no single output named {output!r} (it has "
                             f"{', '.join(repr(o.name) for o in outputs)})")
    readable = [(o, k) for o in chosen if (k := _kind(o)) is not None]
    if len(readable) != 1:
        raise _refuse(where, (
            f"model {model!r} declares outputs "
            f"{', '.join(f'{o.name} {o.datatype}{list(o.shape)}' for o in chosen)}; a verdict "
            "reads exactly one: labels (an integer output, one value per input) or scores (a "
            "floating-point output [n, C])" + ("; name it" if len(readable) > 1 else "")))
    spec, kind = readable[0]
    return ModelMetadata(name, tuple(versions), _string(meta, "platform", where, required=False),
                         inputs, outputs, kind, spec)


def check_inputs(inputs: np.ndarray, meta: ModelMetadata, where: str) -> np.dtype[Any]:
    """The wire dtype of `inputs` for `meta`'s input, or the refusal that says why they do not
    fit: the rank and every fixed dimension must match, and the cast must be lossless."""
    spec = meta.input
    wire = DATATYPES.get(spec.datatype)
    if wire is None:
        raise _refuse(where, f"input {spec.name!r} has datatype {excerpt(spec.datatype, 20)}, "
                             "not a numeric tensor")
    fixed = [(got, want) for got, want in zip(inputs.shape[1:], spec.shape[1:]) if want != -1]
    if len(spec.shape) != inputs.ndim or any(got != want for got, want in fixed) or \
            spec.shape[0] not in (-1, inputs.shape[0]):
        raise _refuse(where, f"model {meta.name!r} takes {spec.name} of shape {list(spec.shape)};"
                             f" the queries are {list(inputs.shape)}: is it the right model?")
    if not np.can_cast(inputs.dtype, wire, casting="safe"):
        raise _refuse(where, f"model {meta.name!r} takes {spec.datatype}; the queries are "
                             f"{inputs.dtype} and would not survive the cast: is it the right "
                             "model?")
    return wire


def encode_infer(inputs: np.ndarray, meta: ModelMetadata, wire: np.dtype[Any],
                 request_id: str) -> bytes:
    """The JSON body of `POST .../infer` for a batch: row-major data in the wire datatype, the
    one output a verdict reads requested by name. Integer queries (images as uint8) are written
    as JSON integers whatever the wire type: the same numbers, exactly, at a fraction of the
    cost of formatting floats (JSON has one number type; the server casts to the datatype).
    Every number is the text `json.dumps` writes for it (`_numbers`)."""
    data = np.ascontiguousarray(inputs, dtype=wire)
    body = {
        "id": request_id,
        "inputs": [{"name": meta.input.name, "shape": list(data.shape),
                    "datatype": meta.input.datatype, "data": _DATA}],
        "outputs": [{"name": meta.output.name}],
    }
    parts = json.dumps(body, separators=(",", ":")).split(_MARK)
    if len(parts) != 2:  # a tensor name holding the marker: never from an honest server
        raise _refuse(meta.name, "a tensor name holds a NUL character")
    source = np.asarray(inputs) if inputs.dtype.kind in "iu" else data
    return parts[0].encode() + _numbers(source.reshape(-1)) + parts[1].encode()


_DATA = "\x00data"  # where the numbers go; a NUL no honest tensor name holds
_MARK = json.dumps(_DATA)
# At most this many distinct numbers are written from a table of their texts (pixels have 256,
# queries on a 256-level grid as many); more, and each number is formatted by json.dumps.
_TABLE_SIZE = 4096


def _numbers(flat: np.ndarray) -> bytes:
    """A JSON array of a flat integer or float array, exactly as `json.dumps(flat.tolist())`
    writes it (integers in decimal, floats as the repr of their float64 value; NaN and
    Infinity refused with json's ValueError). When the array holds few distinct values
    (pixels; queries on a 256-level grid, whatever their dtype), each is formatted once and
    the array is written from that table (`_from_table`): for 64 MNIST-sized queries, 1 ms
    against json.dumps's 5 ms for integers and 30 ms for floats, which it formats one by
    one. Float values are put in the table by their bucket on a grid where they fit one
    (`_bucketed`), else by a sort."""
    if flat.size == 0:
        return b"[]"
    if flat.dtype.kind in "iu":
        low, high = int(flat.min()), int(flat.max())
        if high - low < _TABLE_SIZE:
            texts = [str(v) for v in range(low, high + 1)]
            return _from_table(texts, flat.astype(np.int64) - low)
    else:
        table = _bucketed(flat)
        if table is not None:
            return _from_table(*table)
        # Distinct bit patterns, not values: -0.0 and 0.0 are two numbers on the wire. A
        # sort and a search: np.unique's inverse (an argsort) costs ten times more.
        bits = flat.view(np.dtype(f"u{flat.dtype.itemsize}"))
        ordered = np.sort(bits)
        distinct = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
        values = distinct.view(flat.dtype)
        if len(distinct) <= _TABLE_SIZE and bool(np.all(np.isfinite(values))):
            # float.__repr__ is the text json.dumps writes for a finite float.
            texts = list(map(float.__repr__, values.tolist()))
            return _from_table(texts, np.searchsorted(distinct, bits))
    return json.dumps(flat.tolist(), separators=(",", ":"), allow_nan=False).encode()


def _bucketed(flat: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """(texts, index) of a float array whose values fall into distinct buckets of
    `_TABLE_SIZE` equal steps across their range, else None (`_numbers` then sorts).

    Few distinct values are nearly always a grid (8-bit pixels over 255, or 256 levels
    across a normalised range, as an output key's queries are): each value's bucket is then
    its index, found with a subtract, a multiply and a round, a fifth of a sort and search
    on 64 MNIST-sized queries. Exact whatever the values: every value must equal, bit for
    bit, the one its bucket holds, so two values in one bucket (-0.0 beside 0.0, values
    closer than a step), NaN or an infinity give None."""
    with np.errstate(invalid="ignore", over="ignore"):
        low, high = float(flat.min()), float(flat.max())
        if not np.isfinite(high - low):
            return None
        scale = (_TABLE_SIZE - 1) / (high - low) if high > low else 0.0
        index = np.rint((flat - low) * scale).astype(np.intp)
    np.clip(index, 0, _TABLE_SIZE - 1, out=index)  # the float type's rounding, at the ends
    held = np.empty(_TABLE_SIZE, dtype=flat.dtype)
    held[index] = flat  # one value per bucket, if the buckets separate them
    unsigned = np.dtype(f"u{flat.dtype.itemsize}")
    if not np.array_equal(held[index].view(unsigned), flat.view(unsigned)):
        return None
    used = np.zeros(_TABLE_SIZE, dtype=bool)
    used[index] = True
    texts = [""] * _TABLE_SIZE
    for bucket, value in zip(np.flatnonzero(used).tolist(), held[used].tolist(), strict=True):
        texts[bucket] = float.__repr__(value)  # the text json.dumps writes for a finite float
    return texts, index


def _from_table(texts: list[str], index: np.ndarray) -> bytes:
    """`[texts[i0],texts[i1],...]` for the indices (a take from an object array: eight times
    faster than indexing the list in Python)."""
    return ("[" + ",".join(np.array(texts, dtype=object)[index].tolist()) + "]").encode()


@dataclass(frozen=True)
class InferReply:
    """What one infer reply said: the answers and the model version that gave them."""

    answers: np.ndarray
    model_version: str


def decode_infer(body: bytes, *, meta: ModelMetadata, request_id: str, n: int,
                 where: str) -> InferReply:
    """The answers for a batch of `n`, checked: labels (int64, [n]) or scores ([n, C], the
    declared float type), exactly as the metadata and the request said."""
    reply = load_json(body, where)
    name = _string(reply, "model_name", where)
    if name != meta.name:
        raise _refuse(where, f"the reply is from model {excerpt(name, 60)}, not {meta.name!r}")
    if "id" in reply and reply["id"] != request_id:
        raise _refuse(where, "the reply's id is not the request's")
    version = _string(reply, "model_version", where, required=False)
    outputs = reply.get("outputs")
    if not isinstance(outputs, list):
        raise _refuse(where, "the reply has no 'outputs' list")
    found = [o for o in outputs if isinstance(o, dict) and o.get("name") == meta.output.name]
    if len(found) != 1:
        raise _refuse(where, f"the reply has {len(found)} outputs named {meta.output.name!r}; "
                             "exactly one was asked for")
    out = found[0]
    datatype = _string(out, "datatype", where)
    if datatype != meta.output.datatype:
        raise _refuse(where, f"output {meta.output.name!r} came as {excerpt(datatype, 20)}; the "
                             f"metadata declares {meta.output.datatype}")
    shape = _shape(out.get("shape"), where, f"output {meta.output.name!r}")
    declared = meta.output.shape
    if meta.kind == "labels":  # [n] or [n, 1], whichever the metadata said (servers differ)
        fits = shape in ((n,), (n, 1))
    else:
        fits = len(shape) == 2 and shape[0] == n and shape[1] >= 2 and \
            declared[1] in (-1, shape[1])
    if not fits:
        raise _refuse(where, f"output {meta.output.name!r} has shape {list(shape)} for {n} inputs; "
                             f"the metadata declares {list(declared)}")
    values = _data(out.get("data"), shape, meta.kind, where)
    if meta.kind == "labels":
        return InferReply(values.reshape(n).astype(np.int64), version)
    return InferReply(values.astype(DATATYPES[datatype]).reshape(shape), version)


def _data(data: Any, shape: tuple[int, ...], kind: Kind, where: str) -> np.ndarray:
    size = math.prod(shape)
    if not isinstance(data, list):
        raise _refuse(where, "the output has no 'data' list")
    if kind == "labels":
        if len(data) != size or not all(type(v) is int for v in data):
            raise _refuse(where, f"the labels are not {size} integers (one per input)")
        if any(v < 0 or v >= 2**31 for v in data):
            raise _refuse(where, "a label is negative or absurdly large")
        return np.array(data, dtype=np.int64)
    if len(data) != size or not all(type(v) in (int, float) for v in data):
        raise _refuse(where, f"the scores are not {size} numbers in row-major order "
                             f"({list(shape)} flattened)")
    return np.array(data, dtype=np.float64)
