"""Round trips through `freemark.records.wire`: protobuf <-> record <-> JSON, for every type.

A field missed on one side of a conversion shows up here as an inequality, so the proto,
the records and the file format cannot drift apart silently; the drift tests at the end fail
when a signed field is missing from the typed record, the proto or the JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from freemark.cli.display import print_json
from freemark.errors import InvalidReceiptError
from freemark.records import wire
from freemark.records.schema import from_json_fields, signed_fields
from freemark.records.types import (
    CoarseEndpointVerdict,
    CoarseVerdict,
    ConsistencyProof,
    EndpointExchange,
    EndpointVerdict,
    Receipt,
    ReferencePanel,
    RegistrationInfo,
    SignedStatement,
    SignedVerdict,
    Verdict,
    VerdictPolicy,
    VerdictTest,
)
from freemark.tlog import merkle
from freemark.v1 import keyservice_pb2 as pb
from signed_statements import coarse_log, endpoint_log, standard_log

LOG = standard_log()
COARSE = coarse_log()
ENDPOINT = endpoint_log()

REGISTRATIONS = [
    RegistrationInfo("reg-1", "alice", 1_700_000_000_000_001, b"\x01" * 32, b"\x02" * 32,
                     "features.act", 256, 7, None),
    RegistrationInfo("reg-2", "bob", 1_700_000_000_000_002, b"\x03" * 32, b"\x04" * 32,
                     "act", 64, 8, 1_700_000_999_000_000),
]
CONSISTENCY = ConsistencyProof(2, 5, tuple(bytes([i]) * 32 for i in range(3)), LOG.checkpoint)

# (record, to_proto, from_proto, to_json, from_json); None where a type has no JSON form.
Pair = tuple[Callable[[Any], Any], Callable[[Any], Any]]
CASES: list[tuple[str, Any, Pair, Pair | None]] = [
    ("statement", LOG.statement(0),
     (wire.statement_to_proto, wire.statement_from_proto), None),
    ("entries", [LOG.statement(0), LOG.statement(1), SignedStatement(b'{"log_index":2}', b"", "")],
     (wire.entries_to_proto, wire.entries_from_proto), None),
    ("checkpoint", LOG.checkpoint,
     (wire.checkpoint_to_proto, wire.checkpoint_from_proto),
     (wire.checkpoint_to_json, wire.checkpoint_from_json)),
    ("inclusion", LOG.inclusion(2),
     (wire.inclusion_to_proto, wire.inclusion_from_proto),
     (wire.inclusion_to_json, wire.inclusion_from_json)),
    ("consistency", CONSISTENCY,
     (wire.consistency_to_proto, wire.consistency_from_proto),
     (wire.consistency_to_json, wire.consistency_from_json)),
    ("receipt", LOG.receipt(1),
     (wire.receipt_to_proto, wire.receipt_from_proto),
     (wire.receipt_to_json, wire.receipt_from_json)),
    ("verdict", LOG.verdict(3),
     (wire.verdict_to_proto, wire.verdict_from_proto),
     (wire.verdict_to_json, wire.verdict_from_json)),
    ("coarse verdict", COARSE.coarse_verdict(1),
     (wire.verdict_to_proto, wire.verdict_from_proto),
     (wire.verdict_to_json, wire.verdict_from_json)),
    ("endpoint verdict", ENDPOINT.endpoint_verdict(1),
     (wire.endpoint_verdict_to_proto, wire.endpoint_verdict_from_proto),
     (wire.endpoint_verdict_to_json, wire.endpoint_verdict_from_json)),
    *[(f"registration-{i}", info,
       (wire.registration_to_proto, wire.registration_from_proto),
       (wire.registration_to_json, wire.registration_from_json))
      for i, info in enumerate(REGISTRATIONS)],
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("record", "proto"), [(c[1], c[2]) for c in CASES], ids=IDS)
def test_proto_round_trip_through_wire_bytes(record: Any, proto: Pair) -> None:
    to_proto, from_proto = proto
    message = to_proto(record)
    wire = type(message).FromString(message.SerializeToString())
    assert from_proto(wire) == record


def test_an_entry_a_page_gives_no_signature_reads_unsigned() -> None:
    """Signatures missing from a GetEntries page's end read as empty, never as a neighbour's."""
    page = wire.entries_to_proto([LOG.statement(0), LOG.statement(1)])
    del page.signatures[1:]
    assert wire.entries_from_proto(page) == [
        LOG.statement(0), SignedStatement(LOG.statement(1).body, b"", "")]


JSON_CASES = [(c[1], c[3]) for c in CASES if c[3] is not None]
JSON_IDS = [c[0] for c in CASES if c[3] is not None]


@pytest.mark.parametrize(("record", "pair"), JSON_CASES, ids=JSON_IDS)
def test_json_round_trip_through_text(record: Any, pair: Pair) -> None:
    to_json, from_json = pair
    text = json.dumps(to_json(record))
    assert from_json(json.loads(text)) == record


@pytest.mark.parametrize(
    ("record", "to_json"),
    [(LOG.receipt(0), wire.receipt_to_json), (LOG.verdict(3), wire.verdict_to_json)],
    ids=["receipt", "verdict"],
)
def test_the_cli_json_line_reads_back_as_the_same_statement(
    record: Any, to_json: Callable[[Any], dict[str, Any]]
) -> None:
    out = io.StringIO()
    print_json(to_json(record), out=out)
    assert len(out.getvalue().splitlines()) == 1
    assert wire.statement_from_json(json.loads(out.getvalue())) == record


def test_receipt_json_carries_everything_needed_offline() -> None:
    data = wire.receipt_to_json(LOG.receipt(1))
    for key in ("kind", "registration_id", "log_index", "integrated_time", "signature",
                "key_id", "body", "body_b64", "inclusion"):
        assert key in data
    assert data["body"]["registration_id"] == "reg-0001"
    assert {"hashes", "tree_size", "checkpoint"} <= set(data["inclusion"])
    assert {"note", "tree_size", "root_hash"} == set(data["inclusion"]["checkpoint"])


def test_verdict_json_has_the_issue_fields() -> None:
    data = wire.verdict_to_json(LOG.verdict(3))
    for key in ("registration_id", "n_bits", "matches", "ber", "p_value", "p_value_binomial",
                "alpha", "is_match", "log_index", "signature"):
        assert key in data


@pytest.mark.parametrize(
    ("message", "convert"),
    [
        (pb.Receipt(statement=pb.SignedStatement(body=b"{}")), wire.receipt_from_proto),
        (pb.SignedVerdict(), wire.verdict_from_proto),
        (pb.InclusionProof(log_index=1, tree_size=2), wire.inclusion_from_proto),
    ],
    ids=["receipt without inclusion", "empty verdict", "proof without checkpoint"],
)
def test_a_reply_missing_a_required_part_is_refused(message: Any, convert: Any) -> None:
    with pytest.raises(InvalidReceiptError, match="has no"):
        convert(message)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"log_index": "3"}, "log_index must be an integer"),
        ({"log_index": True}, "log_index must be an integer"),
        ({"host_fingerprint": "ABCD"}, "lowercase hex"),
        ({"host_fingerprint": "xyz"}, "must be hex"),
        ({"signature": "***"}, "base64"),
        ({"kind": "freemark/v1/verdict"}, "verdict.kind|has no field"),
    ],
)
def test_malformed_receipt_json_is_refused_naming_the_field(
    change: dict[str, Any], match: str
) -> None:
    data = {**wire.receipt_to_json(LOG.receipt(0)), **change}
    with pytest.raises(InvalidReceiptError, match=match):
        wire.statement_from_json(data)


# --- one definition per signed record: the drift test ---------------------------------------

# Each proto message of signed records: the typed classes it carries, a genuine instance of
# the first, and the proto fields that are not signed (the envelope every statement travels
# in). A full and a coarse verdict share one message: its fields are the union of theirs.
SIGNED_KINDS = [
    ("receipt", (Receipt,), pb.Receipt, LOG.receipt(1), {"statement", "inclusion"}),
    ("verdict", (SignedVerdict, CoarseVerdict), pb.SignedVerdict, LOG.verdict(3),
     {"statement", "inclusion"}),
    ("endpoint verdict", (EndpointVerdict, CoarseEndpointVerdict), pb.EndpointVerdict,
     ENDPOINT.endpoint_verdict(1),
     {"statement", "inclusion"}),
    ("endpoint exchange", (EndpointExchange,), pb.EndpointExchange,
     ENDPOINT.endpoint_verdict(1).exchanges[0], set()),
    ("verdict test", (VerdictTest,), pb.VerdictTest, LOG.verdict(3).tests[0], set()),
    ("reference panel", (ReferencePanel,), pb.ReferencePanel, LOG.verdict(3).panel, set()),
    ("verdict policy", (VerdictPolicy,), pb.VerdictPolicy, LOG.verdict(3).policy, set()),
]
KIND_IDS = [kind[0] for kind in SIGNED_KINDS]


@pytest.mark.parametrize(("classes", "message", "envelope"),
                         [(k[1], k[2], k[4]) for k in SIGNED_KINDS], ids=KIND_IDS)
def test_the_proto_message_has_exactly_the_signed_fields(
    classes: tuple[type, ...], message: Any, envelope: set[str]
) -> None:
    proto_fields = {f.name for f in message.DESCRIPTOR.fields}
    signed = {spec.proto for cls in classes for spec in signed_fields(cls)}
    for cls in classes:
        missing = {spec.proto for spec in signed_fields(cls)} - proto_fields
        assert missing == set(), f"{cls.__name__}'s signed fields missing from the proto"
    assert proto_fields - envelope - signed == set(), "proto fields outside the field list"


@pytest.mark.parametrize(("cls", "record"), [(Receipt, LOG.receipt(1)),
                                            (SignedVerdict, LOG.verdict(3)),
                                            (CoarseVerdict, COARSE.coarse_verdict(1))],
                         ids=["receipt", "verdict", "coarse verdict"])
def test_every_signed_field_is_typed_proto_and_json(cls: type, record: Any) -> None:
    body = json.loads(record.statement.body)
    signed = {spec.name for spec in signed_fields(cls)}
    assert set(body) == signed | {"kind"}, "the signed body and the field list differ"
    typed = {f.name for f in dataclasses.fields(cls)}
    assert signed <= typed
    data = wire.receipt_to_json(record) if cls is Receipt else wire.verdict_to_json(record)
    for name in signed:
        assert data[name] == body[name], f"JSON {name} differs from the signed body"
    message = (wire.receipt_to_proto(record) if cls is Receipt
               else wire.verdict_to_proto(record))
    for spec in signed_fields(cls):
        if spec.codec.message:
            assert message.HasField(spec.proto), f"proto lacks {spec.proto}"
    assert wire.read_statement(cls, record.statement, record.inclusion) == record


def test_the_checkpoint_is_read_from_its_note() -> None:
    parsed = merkle.parse_checkpoint(LOG.checkpoint.note)
    assert (parsed.tree_size, parsed.root_hash) == (LOG.checkpoint.tree_size,
                                                    LOG.checkpoint.root_hash)
    assert wire.checkpoint_from_note(LOG.checkpoint.note) == LOG.checkpoint
    proto_typed = {f.name for f in pb.SignedCheckpoint.DESCRIPTOR.fields} - {"note"}
    assert proto_typed == {"tree_size", "root_hash"}


@pytest.mark.parametrize(
    "change",
    [lambda m: setattr(m, "tree_size", m.tree_size + 1),
     lambda m: setattr(m, "root_hash", bytes(32)),
     lambda m: setattr(m, "note", b"not a note")],
    ids=["typed size differs", "typed root differs", "not a note"],
)
def test_a_served_checkpoint_must_agree_with_its_note(change: Callable[[Any], None]) -> None:
    message = wire.checkpoint_to_proto(LOG.checkpoint)
    change(message)
    with pytest.raises(InvalidReceiptError):
        wire.checkpoint_from_proto(message)
    data = wire.checkpoint_to_json(wire.checkpoint_from_note(LOG.checkpoint.note))
    data["tree_size"] += 1
    with pytest.raises(InvalidReceiptError, match="tree_size"):
        wire.checkpoint_from_json(data)


def test_the_verdict_body_is_the_offline_judgement_plus_the_binding_fields() -> None:
    judgement = {s.name for s in signed_fields(Verdict)}
    binding = {s.name for s in signed_fields(SignedVerdict)} - judgement
    assert binding == {"registration_id", "requested_by", "suspect_sha256", "suspect_size",
                       "policy", "reading", "log_index", "integrated_time"}
    assert {"outcome", "tests", "panel", "log10_p_value_binomial", "is_match",
            "p_value"} <= judgement


def test_encode_body_signs_exactly_the_field_list() -> None:
    verdict = LOG.verdict(3)
    values = wire.signed_values(verdict)
    assert wire.encode_body(SignedVerdict, values) == verdict.statement.body
    with pytest.raises(ValueError, match="missing \\['requested_by'\\]"):
        wire.encode_body(SignedVerdict, {k: v for k, v in values.items() if k != "requested_by"})
    with pytest.raises(ValueError, match="unknown \\['secret'\\]"):
        wire.encode_body(SignedVerdict, {**values, "secret": 1})
    with pytest.raises(InvalidReceiptError, match="one of"):
        wire.encode_body(SignedVerdict, {**values, "outcome": "maybe"})


@pytest.mark.parametrize(
    ("name", "change"),
    [("receipt", {"layer": "other"}), ("receipt", {"n_bits": 7}),
     ("verdict", {"requested_by": "mallory"}), ("verdict", {"outcome": "no_match"}),
     ("verdict", {"panel": {"size": 3, "sha256": "00" * 32}})],
)
def test_a_reply_whose_typed_fields_differ_from_its_body_is_refused(
    name: str, change: dict[str, Any]
) -> None:
    record = LOG.receipt(1) if name == "receipt" else LOG.verdict(3)
    to_proto = wire.receipt_to_proto if name == "receipt" else wire.verdict_to_proto
    from_proto = wire.receipt_from_proto if name == "receipt" else wire.verdict_from_proto
    message = to_proto(record)
    key, value = next(iter(change.items()))
    if isinstance(value, dict):
        getattr(message, key).CopyFrom(type(getattr(message, key))(
            size=value["size"], sha256=bytes.fromhex(value["sha256"])))
    else:
        setattr(message, key, value)
    with pytest.raises(InvalidReceiptError, match=f"^the server's {name}: {key}"):
        from_proto(message)
    data = {**(wire.receipt_to_json(record) if name == "receipt"
               else wire.verdict_to_json(record)), **change}
    with pytest.raises(InvalidReceiptError, match=f"^{name}: {key}"):
        wire.statement_from_json(data)


def test_the_new_verdict_fields_round_trip_and_read_as_typed_records() -> None:
    verdict = LOG.verdict(3)
    assert verdict.outcome == "match"
    assert verdict.tests == (VerdictTest(name="plain", statistic=256.0, n=256, p_value=1.25e-25,
                                         log10_p_value=-24.903089986991944,
                                         method="permutation-betabinomial"),)
    assert verdict.panel == ReferencePanel.none()
    assert verdict.suspect_sha256 == bytes(range(64, 96))
    data = wire.verdict_to_json(verdict)
    assert data["panel"] == {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    assert data["tests"][0]["name"] == "plain"
    assert wire.verdict_from_proto(pb.SignedVerdict.FromString(
        wire.verdict_to_proto(verdict).SerializeToString())) == verdict


def test_the_offline_verdict_json_reads_back_through_the_same_field_list() -> None:
    verdict = Verdict(**{s.name: getattr(LOG.verdict(3), s.name) for s in signed_fields(Verdict)})
    data = json.loads(json.dumps(verdict.as_dict()))
    assert set(data) == {s.name for s in signed_fields(Verdict)}
    assert Verdict(**from_json_fields(Verdict, data, "verdict")) == verdict


def test_the_cli_verdict_table_shows_every_signed_field() -> None:
    from freemark.cli.common import verdict_fields as _verdict_fields

    rows = _verdict_fields(LOG.verdict(3))
    for spec in signed_fields(SignedVerdict):
        assert spec.name in rows or spec.name == "tests"
    assert rows["test plain"].startswith("256 of 256, p=1.250e-25")
    assert rows["panel"] == "none"


def test_a_coarse_verdict_carries_the_decision_and_no_statistics() -> None:
    """What a thief with Verify access could steer by is not in a coarse verdict at all: not
    in its signed body, its JSON or its typed proto fields."""
    verdict = COARSE.coarse_verdict(1)
    body = json.loads(verdict.statement.body)
    statistics = {s.name for s in signed_fields(Verdict)} - {s.name for s in signed_fields(
        CoarseVerdict)}
    assert statistics == {"matches", "ber", "p_value_method", "p_value_binomial",
                          "log10_p_value_binomial", "tests"}
    assert not statistics & set(body) and not statistics & set(wire.verdict_to_json(verdict))
    message = wire.verdict_to_proto(verdict)
    assert (message.matches, message.ber, message.p_value_method, len(message.tests)) == (
        0, 0.0, "", 0)
    assert body["kind"] == "freemark/v1/coarse-verdict" and body["p_value_above"] == 1e-30
    assert isinstance(wire.verdict_from_proto(message), CoarseVerdict)


def test_a_coarse_body_cannot_pass_for_a_full_verdict_or_back() -> None:
    full, coarse = LOG.verdict(3), COARSE.coarse_verdict(1)
    with pytest.raises(InvalidReceiptError, match="coarse-verdict"):
        wire.read_statement(SignedVerdict, coarse.statement, coarse.inclusion)
    with pytest.raises(InvalidReceiptError, match="not a 'freemark/v1/coarse-verdict'"):
        wire.read_statement(CoarseVerdict, full.statement, full.inclusion)
    data = {**wire.verdict_to_json(coarse), "kind": "freemark/v1/verdict"}
    with pytest.raises(InvalidReceiptError):
        wire.statement_from_json(data)


def test_the_policy_id_is_the_digest_of_its_rules() -> None:
    policy = VerdictPolicy.make(alpha_min=1e-12, alpha_max=1e-6, arbiter_disclosure="coarse")
    assert policy.id == policy.expected_id and policy.id.startswith("sha256:")
    other = VerdictPolicy.make(alpha_min=1e-12, alpha_max=1e-6, arbiter_disclosure="full")
    assert other.id != policy.id
    for low, high in ((0.0, 1e-6), (1e-6, 1e-9), (1e-9, 1.0)):
        with pytest.raises(ValueError, match="0 < alpha_min <= alpha_max < 1"):
            VerdictPolicy.make(alpha_min=low, alpha_max=high, arbiter_disclosure="full")
