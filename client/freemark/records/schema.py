"""Field lists: how a record's fields are written in a signed body, in JSON and in protobuf.

A signed record is declared once, as a frozen dataclass whose signed fields carry a codec::

    @dataclass(frozen=True)
    class Receipt:
        owner: str = field(metadata=signed(TEXT))
        host_fingerprint: bytes = field(metadata=signed(HEX))

That declaration is the field list: `signed_fields(Receipt)` walks it, and every conversion
in `freemark.records.wire` (signed body, typed record, proto message, JSON file) is generic over it.
The signed body and the JSON use the field name as key; the proto field has the same name
unless `signed(..., proto=...)` says otherwise. A field without `signed` metadata (the
statement, the inclusion proof) is not part of the body.

A codec pairs the JSON form (what the body signs: hashes in lowercase hex, numbers as JSON
numbers) with the proto form. Readers raise `InvalidReceiptError` naming the field's path.
This module imports nothing heavier than the standard library, so `freemark.tlog.merkle` and
`freemark.records.types` can declare their fields with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from freemark.errors import InvalidReceiptError

__all__ = [
    "BOOLEAN",
    "HEX",
    "INTEGER",
    "NUMBER",
    "TEXT",
    "Codec",
    "FieldSpec",
    "choice",
    "from_json_fields",
    "from_proto_fields",
    "list_of",
    "nested",
    "signed",
    "signed_fields",
    "to_json_fields",
    "to_proto_fields",
]

_META = "freemark.signed"


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Codec:
    """One field type: JSON writer and reader, proto writer and reader.

    `from_json(value, where)` checks the parsed JSON value and returns the typed one;
    `message` says the proto field is a singular message, which must be present.
    """

    what: str
    to_json: Callable[[Any], Any]
    from_json: Callable[[Any, str], Any]
    to_proto: Callable[[Any], Any] = _same
    from_proto: Callable[[Any], Any] = _same
    message: bool = False


def _bad(where: str, expected: str) -> InvalidReceiptError:
    return InvalidReceiptError(f"{where} must be {expected}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "a string")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # true/false are not integers
        raise _bad(where, "an integer")
    return value


def _number(value: Any, where: str) -> float:
    # RFC 8785 writes 0.0 as 0, so integers are numbers too.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, "a number")
    return float(value)


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "true or false")
    return value


def _hex(value: Any, where: str) -> bytes:
    text = _text(value, where)
    try:
        decoded = bytes.fromhex(text)
    except ValueError:
        raise _bad(where, "hex") from None
    if decoded.hex() != text:
        raise _bad(where, "lowercase hex without spaces")
    return decoded


TEXT = Codec("a string", _same, _text, str, str)
INTEGER = Codec("an integer", _same, _integer, int, int)
NUMBER = Codec("a number", _same, _number, float, float)
BOOLEAN = Codec("true or false", _same, _boolean, bool, bool)
HEX = Codec("lowercase hex", bytes.hex, _hex, bytes, bytes)


def choice(*allowed: str) -> Codec:
    """A string that must be one of `allowed`, in every form: nothing else is signed or read."""
    expected = "one of " + ", ".join(repr(a) for a in allowed)

    def check(value: Any, where: str) -> str:
        if _text(value, where) not in allowed:
            raise _bad(where, expected)
        return str(value)

    def written(value: Any) -> str:
        return check(value, "the value")

    return Codec(expected, written, check, written, written)


def list_of(item: Codec) -> Codec:
    """A list of `item` (a JSON array, a proto `repeated` field); typed as a tuple."""

    def from_json(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _bad(where, f"a list of {item.what}")
        return tuple(item.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))

    return Codec(
        f"a list of {item.what}",
        lambda values: [item.to_json(v) for v in values],
        from_json,
        lambda values: [item.to_proto(v) for v in values],
        lambda values: tuple(item.from_proto(v) for v in values),
    )


def nested(cls: type) -> Codec:
    """A record with its own field list (a JSON object, a proto message)."""

    def from_json(value: Any, where: str) -> Any:
        return cls(**from_json_fields(cls, value, where))

    return Codec(
        f"a {cls.__name__} object",
        to_json_fields,
        from_json,
        to_proto_fields,
        lambda message: cls(**from_proto_fields(cls, message, cls.__name__)),
        message=True,
    )


@dataclass(frozen=True)
class FieldSpec:
    """One entry of a field list: the field's name, its codec and its proto field's name."""

    name: str
    codec: Codec
    proto: str


def signed(codec: Codec, *, proto: str | None = None) -> dict[str, Any]:
    """Metadata for `dataclasses.field`: this field is signed, written with `codec`."""
    return {_META: (codec, proto)}


def signed_fields(cls: type) -> tuple[FieldSpec, ...]:
    """The field list of a record class, in declaration order."""
    specs = []
    for f in dataclasses.fields(cls):
        if _META in f.metadata:
            codec, proto = f.metadata[_META]
            specs.append(FieldSpec(f.name, codec, proto or f.name))
    return tuple(specs)


def to_json_fields(record: Any) -> dict[str, Any]:
    """The signed fields of `record` as JSON values (exactly what the body signs)."""
    return {s.name: s.codec.to_json(getattr(record, s.name)) for s in signed_fields(type(record))}


def from_json_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The typed values of `cls`'s signed fields read from a JSON object.

    Keys that the field list does not name are ignored here; whoever needs a body to hold
    nothing else compares it with its re-encoding.
    """
    if not isinstance(data, Mapping):
        raise InvalidReceiptError(f"{where} must be a JSON object")
    values = {}
    for s in signed_fields(cls):
        if s.name not in data:
            raise InvalidReceiptError(f"{where} has no field {s.name!r}")
        values[s.name] = s.codec.from_json(data[s.name], f"{where}.{s.name}")
    return values


def to_proto_fields(record: Any) -> dict[str, Any]:
    """Keyword arguments for the proto message of `record` (nested messages as dicts)."""
    return {s.proto: s.codec.to_proto(getattr(record, s.name)) for s in signed_fields(type(record))}


def from_proto_fields(cls: type, message: Any, what: str) -> dict[str, Any]:
    """The typed values of `cls`'s signed fields read from a proto message.

    Proto3 gives an empty default for a missing message field; that is refused instead.
    """
    values = {}
    for s in signed_fields(cls):
        if s.codec.message and not message.HasField(s.proto):
            raise InvalidReceiptError(f"the server's {what} has no {s.proto}")
        values[s.name] = s.codec.from_proto(getattr(message, s.proto))
    return values


def names(specs: Iterable[FieldSpec]) -> list[str]:
    """The field names of a field list."""
    return [s.name for s in specs]
