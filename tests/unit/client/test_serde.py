"""Round trips through `freemark._serde`: protobuf <-> record <-> JSON, for every type.

A field missed on one side of a conversion shows up here as an inequality, so the proto,
the records and the file format cannot drift apart silently.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from freemark import _serde
from freemark.display import print_json
from freemark.errors import InvalidReceiptError
from freemark.records import ConsistencyProof, RegistrationInfo
from freemark.v1 import keyservice_pb2 as pb
from signed_statements import standard_log

LOG = standard_log()

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
     (_serde.statement_to_proto, _serde.statement_from_proto), None),
    ("checkpoint", LOG.checkpoint,
     (_serde.checkpoint_to_proto, _serde.checkpoint_from_proto),
     (_serde.checkpoint_to_json, _serde.checkpoint_from_json)),
    ("inclusion", LOG.inclusion(2),
     (_serde.inclusion_to_proto, _serde.inclusion_from_proto),
     (_serde.inclusion_to_json, _serde.inclusion_from_json)),
    ("consistency", CONSISTENCY,
     (_serde.consistency_to_proto, _serde.consistency_from_proto),
     (_serde.consistency_to_json, _serde.consistency_from_json)),
    ("receipt", LOG.receipt(1),
     (_serde.receipt_to_proto, _serde.receipt_from_proto),
     (_serde.receipt_to_json, _serde.receipt_from_json)),
    ("verdict", LOG.verdict(3),
     (_serde.verdict_to_proto, _serde.verdict_from_proto),
     (_serde.verdict_to_json, _serde.verdict_from_json)),
    *[(f"registration-{i}", info,
       (_serde.registration_to_proto, _serde.registration_from_proto),
       (_serde.registration_to_json, _serde.registration_from_json))
      for i, info in enumerate(REGISTRATIONS)],
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("record", "proto"), [(c[1], c[2]) for c in CASES], ids=IDS)
def test_proto_round_trip_through_wire_bytes(record: Any, proto: Pair) -> None:
    to_proto, from_proto = proto
    message = to_proto(record)
    wire = type(message).FromString(message.SerializeToString())
    assert from_proto(wire) == record


JSON_CASES = [(c[1], c[3]) for c in CASES if c[3] is not None]
JSON_IDS = [c[0] for c in CASES if c[3] is not None]


@pytest.mark.parametrize(("record", "pair"), JSON_CASES, ids=JSON_IDS)
def test_json_round_trip_through_text(record: Any, pair: Pair) -> None:
    to_json, from_json = pair
    text = json.dumps(to_json(record))
    assert from_json(json.loads(text)) == record


@pytest.mark.parametrize(
    ("record", "to_json"),
    [(LOG.receipt(0), _serde.receipt_to_json), (LOG.verdict(3), _serde.verdict_to_json)],
    ids=["receipt", "verdict"],
)
def test_the_cli_json_line_reads_back_as_the_same_statement(
    record: Any, to_json: Callable[[Any], dict[str, Any]]
) -> None:
    out = io.StringIO()
    print_json(to_json(record), out=out)
    assert len(out.getvalue().splitlines()) == 1
    assert _serde.statement_from_json(json.loads(out.getvalue())) == record


def test_receipt_json_carries_everything_needed_offline() -> None:
    data = _serde.receipt_to_json(LOG.receipt(1))
    for key in ("kind", "registration_id", "log_index", "integrated_time", "signature",
                "key_id", "body", "body_b64", "inclusion"):
        assert key in data
    assert data["body"]["registration_id"] == "reg-0001"
    assert {"hashes", "tree_size", "checkpoint"} <= set(data["inclusion"])
    assert {"body", "body_b64", "signature"} <= set(data["inclusion"]["checkpoint"])


def test_verdict_json_has_the_issue_fields() -> None:
    data = _serde.verdict_to_json(LOG.verdict(3))
    for key in ("registration_id", "n_bits", "matches", "ber", "p_value", "p_value_binomial",
                "alpha", "is_match", "log_index", "signature"):
        assert key in data


@pytest.mark.parametrize(
    ("message", "convert"),
    [
        (pb.Receipt(statement=pb.SignedStatement(body=b"{}")), _serde.receipt_from_proto),
        (pb.SignedVerdict(), _serde.verdict_from_proto),
        (pb.InclusionProof(log_index=1, tree_size=2), _serde.inclusion_from_proto),
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
    data = {**_serde.receipt_to_json(LOG.receipt(0)), **change}
    with pytest.raises(InvalidReceiptError, match=match):
        _serde.statement_from_json(data)
