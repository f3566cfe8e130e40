"""The one conversion module for records: signed bodies, protobuf messages, JSON files.

Both sides use it: the key server builds each signed body and each reply through it, and the
client reads the replies and files with it (Flower's `serde.py`). Protobuf stays at the edge.

Signed records (`Receipt`, `SignedVerdict` in `freemark.records.types`; the checkpoint in
`freemark.tlog.merkle`) are declared once, as dataclasses whose `signed(...)` fields form the
field list (`freemark.records.schema`). Everything here is generic over that list:

- `encode_body(Receipt, values)` is the signed body, RFC 8785 JSON of `kind` and exactly
  the listed fields (a missing or unknown value is a bug and raises);
- `read_statement(Receipt, statement, inclusion)` is the typed record read FROM the signed
  body (sigstore's `LogEntry`), so its fields are what was signed;
- `receipt_to_proto`, `receipt_from_proto`, `receipt_to_json`, `receipt_from_json` (and the
  verdict's) write every listed field and, reading, refuse typed fields that differ from the
  signed body they travel with.

Adding a field to a signed record: one `signed(...)` line in `freemark.records.types`, the proto
field of the same name (tests/unit/client/records/test_wire.py fails until it exists), and the value
where the server builds the body. A new record kind (a revocation, say) is one dataclass
with `KIND`, its proto message in `_PROTO`, its pair of functions here and an entry in
`_STATEMENTS` and `statement_from_json`'s readers.

The JSON form of a receipt or verdict is self-contained: with the TTP's public key alone,
`freemark.audit.receipt.verify_receipt` checks a file written here. Encodings: hashes, fingerprints
and commitments are lowercase hex (as in the signed bodies); signatures and the exact signed
body bytes are standard base64; the body is also included parsed, for people and `jq`, and
must equal the parsed base64 bytes when read back. The base64 bytes are authoritative.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from freemark.errors import InvalidReceiptError
from freemark.records.schema import (
    BOOLEAN,
    HEX,
    INTEGER,
    NUMBER,
    TEXT,
    Codec,
    from_json_fields,
    from_proto_fields,
    signed_fields,
    to_json_fields,
    to_proto_fields,
)
from freemark.records.types import (
    AnyEndpointVerdict,
    AnyVerdict,
    Checkpoint,
    CoarseEndpointVerdict,
    CoarseVerdict,
    ConsistencyProof,
    EndpointVerdict,
    InclusionProof,
    Receipt,
    RegistrationInfo,
    Revocation,
    SignedStatement,
    SignedVerdict,
)
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark.v1 import keyservice_pb2 as pb

__all__ = [
    "JsonFields",
    "checkpoint_from_json",
    "checkpoint_from_note",
    "checkpoint_from_proto",
    "checkpoint_to_json",
    "checkpoint_to_proto",
    "consistency_from_json",
    "consistency_from_proto",
    "consistency_to_json",
    "consistency_to_proto",
    "encode_body",
    "endpoint_verdict_from_json",
    "endpoint_verdict_from_proto",
    "endpoint_verdict_to_json",
    "endpoint_verdict_to_proto",
    "entries_from_proto",
    "entries_to_proto",
    "inclusion_from_json",
    "inclusion_from_proto",
    "inclusion_to_json",
    "inclusion_to_proto",
    "parse_body",
    "read_statement",
    "receipt_from_json",
    "receipt_from_proto",
    "receipt_to_json",
    "receipt_to_proto",
    "registration_from_json",
    "registration_from_proto",
    "registration_to_json",
    "registration_to_proto",
    "revocation_from_json",
    "revocation_from_proto",
    "revocation_to_json",
    "revocation_to_proto",
    "signed_values",
    "statement_from_json",
    "statement_from_proto",
    "statement_to_proto",
    "typed_mismatch",
    "verdict_from_json",
    "verdict_from_proto",
    "verdict_to_json",
    "verdict_to_proto",
]

Statement = (Receipt | SignedVerdict | CoarseVerdict | Revocation | EndpointVerdict
             | CoarseEndpointVerdict)
S = TypeVar("S", bound=Statement)
V = TypeVar("V", bound=Statement)

# Each signed statement type and its proto message; `kind` picks the type when reading a file
# or a reply (a full and a coarse verdict travel in the same `SignedVerdict` message, a full
# and a coarse endpoint verdict in the same `EndpointVerdict`).
_PROTO: dict[type, Any] = {Receipt: pb.Receipt, SignedVerdict: pb.SignedVerdict,
                           CoarseVerdict: pb.SignedVerdict, Revocation: pb.Revocation,
                           EndpointVerdict: pb.EndpointVerdict,
                           CoarseEndpointVerdict: pb.EndpointVerdict}
_STATEMENTS: tuple[type[Statement], ...] = (Receipt, SignedVerdict, CoarseVerdict, Revocation,
                                            EndpointVerdict, CoarseEndpointVerdict)
_VERDICTS: dict[str, type[AnyVerdict]] = {cls.KIND: cls for cls in (SignedVerdict, CoarseVerdict)}
_ENDPOINT_VERDICTS: dict[str, type[AnyEndpointVerdict]] = {
    cls.KIND: cls for cls in (EndpointVerdict, CoarseEndpointVerdict)}


# --- protobuf <-> dataclass ------------------------------------------------------------------


def _require(message: Any, field: str, what: str) -> None:
    """Proto3 gives an empty default for a missing message field; refuse it instead."""
    if not message.HasField(field):
        raise InvalidReceiptError(f"the server's {what} has no {field}")


def statement_from_proto(message: pb.SignedStatement) -> SignedStatement:
    """Wire statement -> record."""
    return SignedStatement(
        body=message.body, signature=message.signature, key_id=message.key_id
    )


def statement_to_proto(statement: SignedStatement) -> pb.SignedStatement:
    """Record -> wire statement."""
    return pb.SignedStatement(
        body=statement.body, signature=statement.signature, key_id=statement.key_id
    )


def entries_to_proto(entries: Sequence[SignedStatement]) -> pb.GetEntriesResponse:
    """Log entries, each with the statement signature stored beside it -> a GetEntries page."""
    return pb.GetEntriesResponse(
        entries=[e.body for e in entries],
        signatures=[pb.EntrySignature(signature=e.signature, key_id=e.key_id) for e in entries])


def entries_from_proto(message: pb.GetEntriesResponse) -> list[SignedStatement]:
    """A GetEntries page -> each entry with its signature, as the server sent it.

    An entry the page gives no signature for reads with an empty one: nothing here judges
    it; `freemark.audit.registry.verify_entry` refuses it.
    """
    signatures = list(message.signatures)[: len(message.entries)]
    signatures += [pb.EntrySignature()] * (len(message.entries) - len(signatures))
    return [SignedStatement(body=bytes(body), signature=bytes(s.signature), key_id=s.key_id)
            for body, s in zip(message.entries, signatures, strict=True)]


def checkpoint_from_proto(message: pb.SignedCheckpoint) -> Checkpoint:
    """Wire checkpoint -> record, read from its note; the typed size and root must agree."""
    return _checkpoint_agreeing(checkpoint_from_note(message.note), message.tree_size,
                                message.root_hash, "the server's checkpoint")


def checkpoint_to_proto(checkpoint: Checkpoint) -> pb.SignedCheckpoint:
    """Record -> wire checkpoint."""
    return pb.SignedCheckpoint(
        note=checkpoint.note, tree_size=checkpoint.tree_size, root_hash=checkpoint.root_hash
    )


def inclusion_from_proto(message: pb.InclusionProof) -> InclusionProof:
    """Wire inclusion proof -> record; the checkpoint must be present."""
    _require(message, "checkpoint", "inclusion proof")
    return InclusionProof(
        log_index=message.log_index,
        tree_size=message.tree_size,
        hashes=tuple(message.hashes),
        checkpoint=checkpoint_from_proto(message.checkpoint),
    )


def inclusion_to_proto(proof: InclusionProof) -> pb.InclusionProof:
    """Record -> wire inclusion proof."""
    return pb.InclusionProof(
        log_index=proof.log_index,
        tree_size=proof.tree_size,
        hashes=list(proof.hashes),
        checkpoint=checkpoint_to_proto(proof.checkpoint),
    )


def consistency_from_proto(message: pb.ConsistencyProof) -> ConsistencyProof:
    """Wire consistency proof -> record; the checkpoint must be present."""
    _require(message, "checkpoint", "consistency proof")
    return ConsistencyProof(
        old_size=message.old_size,
        new_size=message.new_size,
        hashes=tuple(message.hashes),
        checkpoint=checkpoint_from_proto(message.checkpoint),
    )


def consistency_to_proto(proof: ConsistencyProof) -> pb.ConsistencyProof:
    """Record -> wire consistency proof."""
    return pb.ConsistencyProof(
        old_size=proof.old_size,
        new_size=proof.new_size,
        hashes=list(proof.hashes),
        checkpoint=checkpoint_to_proto(proof.checkpoint),
    )


# --- signed bodies ---------------------------------------------------------------------------


def signed_values(record: Any) -> dict[str, Any]:
    """The typed values of `record`'s signed fields, by name (e.g. a `Verdict`'s judgement)."""
    return {spec.name: getattr(record, spec.name) for spec in signed_fields(type(record))}


def encode_body(cls: type[Statement], values: Mapping[str, Any]) -> bytes:
    """The signed body of a `cls` statement: RFC 8785 JSON of its kind and exactly its fields.

    `values` are typed (bytes, tuples of records); the server passes every field of the field
    list, and a missing or unknown one raises `ValueError`: nothing unlisted is ever signed.
    """
    specs = signed_fields(cls)
    expected = {spec.name for spec in specs}
    if set(values) != expected:
        missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
        raise ValueError(f"{cls.__name__} body: missing {missing}, unknown {unknown}")
    body = {spec.name: spec.codec.to_json(values[spec.name]) for spec in specs}
    return canonical_json({"kind": cls.KIND, **body})


def read_statement(cls: type[S], statement: SignedStatement, inclusion: InclusionProof) -> S:
    """The typed record whose fields are read from the statement's signed body.

    Refuses a body that is not JSON, is of another kind or lacks a listed field. It does not
    check the signature or the inclusion proof: `freemark.audit.receipt.verify_receipt` does.
    """
    body = parse_body(statement.body, "statement")
    if body.get("kind") != cls.KIND:
        raise InvalidReceiptError(f"the signed body is a {body.get('kind')!r}, not a {cls.KIND!r}")
    fields = from_json_fields(cls, body, "signed body")
    return cls(statement=statement, inclusion=inclusion, **fields)  # type: ignore[arg-type]


def _what(cls: type) -> str:
    """How messages name a statement type: "receipt", "verdict", "coarse verdict"."""
    words = re.findall(r"[A-Z][a-z]*", cls.__name__)
    return " ".join(w.lower() for w in words if w != "Signed")


def _verdict_class(body: bytes, classes: Mapping[str, type[V]]) -> type[V]:
    """The verdict type (among `classes`, by kind) a signed body declares by its `kind`."""
    kind = parse_body(body, "statement").get("kind")
    if not isinstance(kind, str) or kind not in classes:
        raise InvalidReceiptError(f"the signed body is a {kind!r}, not a verdict "
                                  f"({' or '.join(repr(k) for k in classes)})")
    return classes[kind]


def _shown(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


def typed_mismatch(record: Any, signed: Mapping[str, Any]) -> str | None:
    """Why `record`'s typed fields differ from the `signed` values, or None if they agree."""
    for name, signed_value in signed.items():
        value = getattr(record, name)
        if value != signed_value:
            return f"{name} {_shown(value)} differs from the signed body's {_shown(signed_value)}"
    return None


def _agreeing(record: S, claimed: Mapping[str, Any], where: str) -> S:
    """`record` (read from its body), once the typed copies `claimed` beside it agree."""
    mismatch = typed_mismatch(record, claimed)
    if mismatch is not None:
        raise InvalidReceiptError(f"{where}: {mismatch}")
    return record


def _checkpoint_agreeing(read: Checkpoint, tree_size: int, root_hash: bytes, where: str
                         ) -> Checkpoint:
    """`read` (from its note), once the typed size and root beside it agree with the note."""
    if tree_size != read.tree_size:
        raise InvalidReceiptError(f"{where}: tree_size {tree_size} differs from the signed "
                                  f"note's {read.tree_size}")
    if root_hash != read.root_hash:
        raise InvalidReceiptError(f"{where}: root_hash differs from the signed note's")
    return read


def checkpoint_from_note(note: bytes) -> Checkpoint:
    """The served checkpoint for a signed note: its typed fields read from the note's text."""
    try:
        parsed = merkle.parse_checkpoint(note)
    except merkle.LogProofError as exc:
        raise InvalidReceiptError(str(exc)) from None
    return Checkpoint(note=note, tree_size=parsed.tree_size, root_hash=parsed.root_hash)


# --- statements <-> protobuf -------------------------------------------------------------------


def _statement_to_proto(record: Statement) -> Any:
    return _PROTO[type(record)](
        statement=statement_to_proto(record.statement),
        inclusion=inclusion_to_proto(record.inclusion),
        **to_proto_fields(record),
    )


def _statement_from_proto(cls: type[S], message: Any) -> S:
    what = _what(cls)
    _require(message, "statement", what)
    _require(message, "inclusion", what)
    claimed = from_proto_fields(cls, message, what)
    record = read_statement(cls, statement_from_proto(message.statement),
                            inclusion_from_proto(message.inclusion))
    return _agreeing(record, claimed, f"the server's {what}")


def receipt_from_proto(message: pb.Receipt) -> Receipt:
    """Wire receipt -> record, read from its signed body; the typed fields must agree."""
    return _statement_from_proto(Receipt, message)


def receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    """Record -> wire receipt."""
    message: pb.Receipt = _statement_to_proto(receipt)
    return message


def verdict_from_proto(message: pb.SignedVerdict) -> AnyVerdict:
    """Wire verdict -> record, full or coarse as its signed body's kind says; the typed
    fields must agree with the body (a coarse verdict's unlisted statistics are unset)."""
    _require(message, "statement", "verdict")
    cls = _verdict_class(message.statement.body, _VERDICTS)
    verdict: AnyVerdict = _statement_from_proto(cls, message)
    return verdict


def verdict_to_proto(verdict: AnyVerdict) -> pb.SignedVerdict:
    """Record -> wire verdict."""
    message: pb.SignedVerdict = _statement_to_proto(verdict)
    return message


def endpoint_verdict_from_proto(message: pb.EndpointVerdict) -> AnyEndpointVerdict:
    """Wire endpoint verdict -> record, full or coarse as its signed body's kind says; the
    typed fields must agree with the body."""
    _require(message, "statement", "endpoint verdict")
    cls = _verdict_class(message.statement.body, _ENDPOINT_VERDICTS)
    verdict: AnyEndpointVerdict = _statement_from_proto(cls, message)
    return verdict


def endpoint_verdict_to_proto(verdict: AnyEndpointVerdict) -> pb.EndpointVerdict:
    """Record -> wire endpoint verdict."""
    message: pb.EndpointVerdict = _statement_to_proto(verdict)
    return message


def revocation_from_proto(message: pb.Revocation) -> Revocation:
    """Wire revocation -> record, read from its signed body; the typed fields must agree."""
    return _statement_from_proto(Revocation, message)


def revocation_to_proto(revocation: Revocation) -> pb.Revocation:
    """Record -> wire revocation."""
    message: pb.Revocation = _statement_to_proto(revocation)
    return message


def registration_from_proto(message: pb.RegistrationInfo) -> RegistrationInfo:
    """Wire registration -> record; the wire's `revoked_at` 0 (active) becomes None."""
    return RegistrationInfo(
        registration_id=message.registration_id,
        owner=message.owner,
        integrated_time=message.integrated_time,
        host_fingerprint=message.host_fingerprint,
        watermark_commitment=message.watermark_commitment,
        layer=message.layer,
        n_bits=message.n_bits,
        log_index=message.log_index,
        revoked_at=message.revoked_at or None,
        revocation=(revocation_from_proto(message.revocation)
                    if message.HasField("revocation") else None),
    )


def registration_to_proto(info: RegistrationInfo) -> pb.RegistrationInfo:
    """Record -> wire registration."""
    return pb.RegistrationInfo(
        registration_id=info.registration_id,
        owner=info.owner,
        integrated_time=info.integrated_time,
        host_fingerprint=info.host_fingerprint,
        watermark_commitment=info.watermark_commitment,
        layer=info.layer,
        n_bits=info.n_bits,
        log_index=info.log_index,
        revoked_at=info.revoked_at or 0,
        revocation=None if info.revocation is None else revocation_to_proto(info.revocation),
    )


# --- JSON readers ------------------------------------------------------------------------------


class JsonFields:
    """Typed access to one JSON object of a file; every error names the field's path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise InvalidReceiptError(f"{where} must be a JSON object")
        self._data = data
        self._where = where

    def raw(self, key: str) -> Any:
        """The value as parsed, any JSON type."""
        if key not in self._data:
            raise InvalidReceiptError(f"{self._where} has no field {key!r}")
        return self._data[key]

    def read(self, key: str, codec: Codec) -> Any:
        """The value read with a field codec of `freemark.records.schema`."""
        return codec.from_json(self.raw(key), f"{self._where}.{key}")

    def text(self, key: str) -> str:
        """A JSON string."""
        value: str = self.read(key, TEXT)
        return value

    def integer(self, key: str) -> int:
        """A JSON integer (true/false are not integers here)."""
        value: int = self.read(key, INTEGER)
        return value

    def optional_integer(self, key: str) -> int | None:
        """A JSON integer or null."""
        return None if self.raw(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        """A JSON number; RFC 8785 writes 0.0 as 0, so integers are accepted."""
        value: float = self.read(key, NUMBER)
        return value

    def boolean(self, key: str) -> bool:
        """A JSON boolean."""
        value: bool = self.read(key, BOOLEAN)
        return value

    def hex(self, key: str) -> bytes:
        """Bytes written as lowercase hex."""
        value: bytes = self.read(key, HEX)
        return value

    def hex_list(self, key: str) -> tuple[bytes, ...]:
        """A list of hex strings."""
        value = self.raw(key)
        if not isinstance(value, list):
            raise InvalidReceiptError(f"{self._where}.{key} must be a list of hex strings")
        where = f"{self._where}.{key}"
        return tuple(HEX.from_json(item, f"{where}[{i}]") for i, item in enumerate(value))

    def b64(self, key: str) -> bytes:
        """Bytes written as standard base64."""
        try:
            return base64.b64decode(self.text(key), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidReceiptError(f"{self._where}.{key} must be standard base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_body(body: bytes, what: str) -> dict[str, Any]:
    """A signed body parsed as a JSON object; anything else is an `InvalidReceiptError`."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise InvalidReceiptError(f"the {what} body is not JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidReceiptError(f"the {what} body is not a JSON object")
    return parsed


def _signed_body(fields: JsonFields, what: str) -> bytes:
    """The exact signed bytes from `body_b64`, refusing a readable `body` that differs."""
    body = fields.b64("body_b64")
    if parse_body(body, what) != fields.raw("body"):
        raise InvalidReceiptError(
            f"the readable {what} body differs from the signed bytes in body_b64"
        )
    return body


# --- dataclass <-> JSON ------------------------------------------------------------------------


def checkpoint_to_json(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint as a JSON object: the signed note as text, its size and root repeated."""
    return {
        "tree_size": checkpoint.tree_size,
        "root_hash": checkpoint.root_hash.hex(),
        "note": checkpoint.note.decode("utf-8"),
    }


def checkpoint_from_json(data: Any, where: str = "checkpoint") -> Checkpoint:
    """The inverse of `checkpoint_to_json`; the size and root must be the note's."""
    fields = JsonFields(data, where)
    return _checkpoint_agreeing(checkpoint_from_note(fields.text("note").encode("utf-8")),
                                fields.integer("tree_size"), fields.hex("root_hash"), where)


def inclusion_to_json(proof: InclusionProof) -> dict[str, Any]:
    """An inclusion proof as a JSON object, with its checkpoint."""
    return {
        "log_index": proof.log_index,
        "tree_size": proof.tree_size,
        "hashes": [node.hex() for node in proof.hashes],
        "checkpoint": checkpoint_to_json(proof.checkpoint),
    }


def inclusion_from_json(data: Any, where: str = "inclusion") -> InclusionProof:
    """The inverse of `inclusion_to_json`."""
    fields = JsonFields(data, where)
    return InclusionProof(
        log_index=fields.integer("log_index"),
        tree_size=fields.integer("tree_size"),
        hashes=fields.hex_list("hashes"),
        checkpoint=checkpoint_from_json(fields.raw("checkpoint"), f"{where}.checkpoint"),
    )


def consistency_to_json(proof: ConsistencyProof) -> dict[str, Any]:
    """A consistency proof as a JSON object, with the newer checkpoint."""
    return {
        "old_size": proof.old_size,
        "new_size": proof.new_size,
        "hashes": [node.hex() for node in proof.hashes],
        "checkpoint": checkpoint_to_json(proof.checkpoint),
    }


def consistency_from_json(data: Any, where: str = "consistency") -> ConsistencyProof:
    """The inverse of `consistency_to_json`."""
    fields = JsonFields(data, where)
    return ConsistencyProof(
        old_size=fields.integer("old_size"),
        new_size=fields.integer("new_size"),
        hashes=fields.hex_list("hashes"),
        checkpoint=checkpoint_from_json(fields.raw("checkpoint"), f"{where}.checkpoint"),
    )


def _statement_to_json(kind: str, statement: SignedStatement) -> dict[str, Any]:
    return {
        "kind": kind,
        "body": parse_body(statement.body, "statement"),
        "body_b64": _b64(statement.body),
        "signature": _b64(statement.signature),
        "key_id": statement.key_id,
    }


def _statement_from_json(fields: JsonFields) -> SignedStatement:
    return SignedStatement(
        body=_signed_body(fields, "statement"),
        signature=fields.b64("signature"),
        key_id=fields.text("key_id"),
    )


def _record_to_json(record: Statement) -> dict[str, Any]:
    return {
        **_statement_to_json(record.KIND, record.statement),
        **to_json_fields(record),
        "inclusion": inclusion_to_json(record.inclusion),
    }


def _record_from_json(cls: type[S], data: Any) -> S:
    what = _what(cls)
    fields = JsonFields(data, what)
    if fields.text("kind") != cls.KIND:
        raise InvalidReceiptError(f"{what}.kind must be {cls.KIND!r}")
    claimed = from_json_fields(cls, data, what)
    record = read_statement(cls, _statement_from_json(fields),
                            inclusion_from_json(fields.raw("inclusion"), f"{what}.inclusion"))
    return _agreeing(record, claimed, what)


def receipt_to_json(receipt: Receipt) -> dict[str, Any]:
    """A receipt as one self-contained JSON object (the `freemark register --json` output)."""
    return _record_to_json(receipt)


def receipt_from_json(data: Any) -> Receipt:
    """The inverse of `receipt_to_json`; the typed fields must agree with the signed body."""
    return _record_from_json(Receipt, data)


def verdict_to_json(verdict: AnyVerdict) -> dict[str, Any]:
    """A verdict as one self-contained JSON object (the `freemark verify --json` output)."""
    return _record_to_json(verdict)


def verdict_from_json(data: Any) -> AnyVerdict:
    """The inverse of `verdict_to_json`, full or coarse by the object's `kind`; the typed
    fields must agree with the signed body."""
    kind = JsonFields(data, "verdict").text("kind")
    if kind not in _VERDICTS:
        raise InvalidReceiptError(f"verdict.kind must be {' or '.join(map(repr, _VERDICTS))}")
    verdict: AnyVerdict = _record_from_json(_VERDICTS[kind], data)
    return verdict


def endpoint_verdict_to_json(verdict: AnyEndpointVerdict) -> dict[str, Any]:
    """An endpoint verdict as one self-contained JSON object (`freemark verify --endpoint
    --json`)."""
    return _record_to_json(verdict)


def endpoint_verdict_from_json(data: Any) -> AnyEndpointVerdict:
    """The inverse of `endpoint_verdict_to_json`, full or coarse by the object's `kind`; the
    typed fields must agree with the signed body."""
    kind = JsonFields(data, "endpoint verdict").text("kind")
    if kind not in _ENDPOINT_VERDICTS:
        raise InvalidReceiptError("endpoint verdict.kind must be "
                                  + " or ".join(map(repr, _ENDPOINT_VERDICTS)))
    verdict: AnyEndpointVerdict = _record_from_json(_ENDPOINT_VERDICTS[kind], data)
    return verdict


def revocation_to_json(revocation: Revocation) -> dict[str, Any]:
    """A revocation as one self-contained JSON object (in `freemark revoke --json`)."""
    return _record_to_json(revocation)


def revocation_from_json(data: Any) -> Revocation:
    """The inverse of `revocation_to_json`; the typed fields must agree with the signed body."""
    return _record_from_json(Revocation, data)


def statement_from_json(data: Any) -> Statement:
    """A receipt, verdict or revocation (any signed statement type), by the object's `kind`."""
    kind = JsonFields(data, "file").text("kind")
    readers: dict[str, Callable[[Any], Statement]] = {
        Receipt.KIND: receipt_from_json, Revocation.KIND: revocation_from_json,
        **{k: endpoint_verdict_from_json for k in _ENDPOINT_VERDICTS},
        **{k: verdict_from_json for k in _VERDICTS}}
    if kind in readers:
        return readers[kind](data)
    known = " nor ".join(f"a {_what(cls)} ({cls.KIND!r})" for cls in _STATEMENTS)
    raise InvalidReceiptError(f"kind {kind!r} is neither {known}")


def registration_to_json(info: RegistrationInfo) -> dict[str, Any]:
    """Registration metadata as a JSON object; `revoked_at` is null while active."""
    return {
        "registration_id": info.registration_id,
        "owner": info.owner,
        "integrated_time": info.integrated_time,
        "host_fingerprint": info.host_fingerprint.hex(),
        "watermark_commitment": info.watermark_commitment.hex(),
        "layer": info.layer,
        "n_bits": info.n_bits,
        "log_index": info.log_index,
        "revoked_at": info.revoked_at,
        "revocation": None if info.revocation is None else revocation_to_json(info.revocation),
    }


def registration_from_json(data: Any) -> RegistrationInfo:
    """The inverse of `registration_to_json`."""
    fields = JsonFields(data, "registration")
    return RegistrationInfo(
        registration_id=fields.text("registration_id"),
        owner=fields.text("owner"),
        integrated_time=fields.integer("integrated_time"),
        host_fingerprint=fields.hex("host_fingerprint"),
        watermark_commitment=fields.hex("watermark_commitment"),
        layer=fields.text("layer"),
        n_bits=fields.integer("n_bits"),
        log_index=fields.integer("log_index"),
        revoked_at=fields.optional_integer("revoked_at"),
        revocation=(None if fields.raw("revocation") is None
                    else revocation_from_json(fields.raw("revocation"))),
    )
