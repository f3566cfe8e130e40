"""The one place that converts records: protobuf messages <-> dataclasses <-> JSON objects.

Protobuf stays at the edge (`freemark.rpc`); files hold the JSON form. Every type has a pair
of functions in each direction and a round-trip test, so a field added to the proto cannot be
silently dropped on one side (Flower's `serde.py`).

The JSON form of a receipt or verdict is self-contained: with the TTP's public key alone,
`freemark.receipt.verify_receipt` checks a file written here. Encodings: hashes, fingerprints
and commitments are lowercase hex (as in the signed bodies); signatures and the exact signed
body bytes are standard base64; the body is also included parsed, for people and `jq`, and
must equal the parsed base64 bytes when read back. The base64 bytes are authoritative.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from freemark.errors import InvalidReceiptError
from freemark.records import (
    RECEIPT_KIND,
    VERDICT_KIND,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    Receipt,
    RegistrationInfo,
    SignedStatement,
    SignedVerdict,
)
from freemark.v1 import keyservice_pb2 as pb

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


def checkpoint_from_proto(message: pb.SignedCheckpoint) -> Checkpoint:
    """Wire checkpoint -> record."""
    return Checkpoint(
        body=message.body,
        signature=message.signature,
        tree_size=message.tree_size,
        root_hash=message.root_hash,
    )


def checkpoint_to_proto(checkpoint: Checkpoint) -> pb.SignedCheckpoint:
    """Record -> wire checkpoint."""
    return pb.SignedCheckpoint(
        body=checkpoint.body,
        signature=checkpoint.signature,
        tree_size=checkpoint.tree_size,
        root_hash=checkpoint.root_hash,
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


def receipt_from_proto(message: pb.Receipt) -> Receipt:
    """Wire receipt -> record; statement and inclusion proof must be present."""
    _require(message, "statement", "receipt")
    _require(message, "inclusion", "receipt")
    return Receipt(
        statement=statement_from_proto(message.statement),
        registration_id=message.registration_id,
        owner=message.owner,
        integrated_time=message.integrated_time,
        host_fingerprint=message.host_fingerprint,
        watermark_commitment=message.watermark_commitment,
        log_index=message.log_index,
        inclusion=inclusion_from_proto(message.inclusion),
    )


def receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    """Record -> wire receipt."""
    return pb.Receipt(
        statement=statement_to_proto(receipt.statement),
        registration_id=receipt.registration_id,
        owner=receipt.owner,
        integrated_time=receipt.integrated_time,
        host_fingerprint=receipt.host_fingerprint,
        watermark_commitment=receipt.watermark_commitment,
        log_index=receipt.log_index,
        inclusion=inclusion_to_proto(receipt.inclusion),
    )


def verdict_from_proto(message: pb.SignedVerdict) -> SignedVerdict:
    """Wire verdict -> record; statement and inclusion proof must be present."""
    _require(message, "statement", "verdict")
    _require(message, "inclusion", "verdict")
    return SignedVerdict(
        statement=statement_from_proto(message.statement),
        registration_id=message.registration_id,
        n_bits=message.n_bits,
        matches=message.matches,
        ber=message.ber,
        p_value=message.p_value,
        log10_p_value=message.log10_p_value,
        p_value_method=message.p_value_method,
        p_value_binomial=message.p_value_binomial,
        alpha=message.alpha,
        is_match=message.is_match,
        log_index=message.log_index,
        integrated_time=message.integrated_time,
        inclusion=inclusion_from_proto(message.inclusion),
    )


def verdict_to_proto(verdict: SignedVerdict) -> pb.SignedVerdict:
    """Record -> wire verdict."""
    return pb.SignedVerdict(
        statement=statement_to_proto(verdict.statement),
        registration_id=verdict.registration_id,
        n_bits=verdict.n_bits,
        matches=verdict.matches,
        ber=verdict.ber,
        p_value=verdict.p_value,
        log10_p_value=verdict.log10_p_value,
        p_value_method=verdict.p_value_method,
        p_value_binomial=verdict.p_value_binomial,
        alpha=verdict.alpha,
        is_match=verdict.is_match,
        log_index=verdict.log_index,
        integrated_time=verdict.integrated_time,
        inclusion=inclusion_to_proto(verdict.inclusion),
    )


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
    )


# --- JSON readers ------------------------------------------------------------------------------


class JsonFields:
    """Typed access to one JSON object of a file; every error names the field's path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise InvalidReceiptError(f"{where} must be a JSON object")
        self._data = data
        self._where = where

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise InvalidReceiptError(f"{self._where} has no field {key!r}")
        return self._data[key]

    def _bad(self, key: str, expected: str) -> InvalidReceiptError:
        return InvalidReceiptError(f"{self._where}.{key} must be {expected}")

    def raw(self, key: str) -> Any:
        """The value as parsed, any JSON type."""
        return self._get(key)

    def text(self, key: str) -> str:
        """A JSON string."""
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def integer(self, key: str) -> int:
        """A JSON integer (true/false are not integers here)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def optional_integer(self, key: str) -> int | None:
        """A JSON integer or null."""
        return None if self._get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        """A JSON number; RFC 8785 writes 0.0 as 0, so integers are accepted."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        return float(value)

    def boolean(self, key: str) -> bool:
        """A JSON boolean."""
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def hex(self, key: str) -> bytes:
        """Bytes written as lowercase hex."""
        value = self.text(key)
        try:
            decoded = bytes.fromhex(value)
        except ValueError:
            raise self._bad(key, "hex") from None
        if decoded.hex() != value:
            raise self._bad(key, "lowercase hex without spaces")
        return decoded

    def hex_list(self, key: str) -> tuple[bytes, ...]:
        """A list of hex strings."""
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list of hex strings")
        where = f"{self._where}.{key}"
        return tuple(JsonFields({"item": item}, where).hex("item") for item in value)

    def b64(self, key: str) -> bytes:
        """Bytes written as standard base64."""
        try:
            return base64.b64decode(self.text(key), validate=True)
        except (binascii.Error, ValueError):
            raise self._bad(key, "standard base64") from None


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
    """A checkpoint as a JSON object: the signed body parsed and as base64, and its signature."""
    return {
        "tree_size": checkpoint.tree_size,
        "root_hash": checkpoint.root_hash.hex(),
        "body": parse_body(checkpoint.body, "checkpoint"),
        "body_b64": _b64(checkpoint.body),
        "signature": _b64(checkpoint.signature),
    }


def checkpoint_from_json(data: Any, where: str = "checkpoint") -> Checkpoint:
    """The inverse of `checkpoint_to_json`."""
    fields = JsonFields(data, where)
    return Checkpoint(
        body=_signed_body(fields, "checkpoint"),
        signature=fields.b64("signature"),
        tree_size=fields.integer("tree_size"),
        root_hash=fields.hex("root_hash"),
    )


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


def receipt_to_json(receipt: Receipt) -> dict[str, Any]:
    """A receipt as one self-contained JSON object (the `freemark register --json` output)."""
    return {
        **_statement_to_json(RECEIPT_KIND, receipt.statement),
        "registration_id": receipt.registration_id,
        "owner": receipt.owner,
        "integrated_time": receipt.integrated_time,
        "host_fingerprint": receipt.host_fingerprint.hex(),
        "watermark_commitment": receipt.watermark_commitment.hex(),
        "log_index": receipt.log_index,
        "inclusion": inclusion_to_json(receipt.inclusion),
    }


def receipt_from_json(data: Any) -> Receipt:
    """The inverse of `receipt_to_json`."""
    fields = JsonFields(data, "receipt")
    if fields.text("kind") != RECEIPT_KIND:
        raise InvalidReceiptError(f"receipt.kind must be {RECEIPT_KIND!r}")
    return Receipt(
        statement=_statement_from_json(fields),
        registration_id=fields.text("registration_id"),
        owner=fields.text("owner"),
        integrated_time=fields.integer("integrated_time"),
        host_fingerprint=fields.hex("host_fingerprint"),
        watermark_commitment=fields.hex("watermark_commitment"),
        log_index=fields.integer("log_index"),
        inclusion=inclusion_from_json(fields.raw("inclusion"), "receipt.inclusion"),
    )


def verdict_to_json(verdict: SignedVerdict) -> dict[str, Any]:
    """A verdict as one self-contained JSON object (the `freemark verify --json` output)."""
    return {
        **_statement_to_json(VERDICT_KIND, verdict.statement),
        "registration_id": verdict.registration_id,
        "n_bits": verdict.n_bits,
        "matches": verdict.matches,
        "ber": verdict.ber,
        "p_value": verdict.p_value,
        "log10_p_value": verdict.log10_p_value,
        "p_value_method": verdict.p_value_method,
        "p_value_binomial": verdict.p_value_binomial,
        "alpha": verdict.alpha,
        "is_match": verdict.is_match,
        "log_index": verdict.log_index,
        "integrated_time": verdict.integrated_time,
        "inclusion": inclusion_to_json(verdict.inclusion),
    }


def verdict_from_json(data: Any) -> SignedVerdict:
    """The inverse of `verdict_to_json`."""
    fields = JsonFields(data, "verdict")
    if fields.text("kind") != VERDICT_KIND:
        raise InvalidReceiptError(f"verdict.kind must be {VERDICT_KIND!r}")
    return SignedVerdict(
        statement=_statement_from_json(fields),
        registration_id=fields.text("registration_id"),
        n_bits=fields.integer("n_bits"),
        matches=fields.integer("matches"),
        ber=fields.number("ber"),
        p_value=fields.number("p_value"),
        log10_p_value=fields.number("log10_p_value"),
        p_value_method=fields.text("p_value_method"),
        p_value_binomial=fields.number("p_value_binomial"),
        alpha=fields.number("alpha"),
        is_match=fields.boolean("is_match"),
        log_index=fields.integer("log_index"),
        integrated_time=fields.integer("integrated_time"),
        inclusion=inclusion_from_json(fields.raw("inclusion"), "verdict.inclusion"),
    )


def statement_from_json(data: Any) -> Receipt | SignedVerdict:
    """A receipt or a verdict, chosen by the object's `kind`."""
    kind = JsonFields(data, "file").text("kind")
    if kind == RECEIPT_KIND:
        return receipt_from_json(data)
    if kind == VERDICT_KIND:
        return verdict_from_json(data)
    raise InvalidReceiptError(
        f"kind {kind!r} is neither a receipt ({RECEIPT_KIND!r}) nor a verdict ({VERDICT_KIND!r})"
    )


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
    )
