"""A verdict's signed word, checked offline: its policy and decision agree with themselves,
it is about one file, and it is in the log a later checkpoint signs.

Real Ed25519 signatures and a real Merkle log (tests/signed_statements.py): a statement that
is validly signed but inconsistent is exactly what a buggy or dishonest TTP would issue.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from freemark.audit.receipt import verify_in_log, verify_receipt, verify_suspect
from freemark.errors import InvalidReceiptError, VerificationFailedError
from freemark.records.schema import to_json_fields
from freemark.records.types import ConsistencyProof
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark.verdict.decision import COARSE_EDGES, coarse_values, p_value_bucket
from freemark_keyserver.crypto import SigningKey
from signed_statements import (
    POLICY,
    build_log,
    coarse_log,
    receipt_body,
    sign_checkpoint,
    verdict_body,
)

SIGNER = SigningKey.generate()
PEM = SIGNER.public_key_pem()


def _verdict(**overrides: object) -> object:
    log = build_log([canonical_json(receipt_body(0)),
                     canonical_json(verdict_body(1, **overrides))], SIGNER)
    return log.verdict(1)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"alpha": 0.99, "is_match": True, "outcome": "match"}, "outside its own policy"),
    ({"is_match": False, "outcome": "no_match"}, "is_match=False for p-value"),
    ({"outcome": "no_match"}, "contradicts is_match=True"),
    ({"policy": {**to_json_fields(POLICY), "alpha_max": 0.5}}, "not the digest of its rules"),
], ids=["framing alpha", "decision", "outcome", "policy id"])
def test_a_signed_but_inconsistent_verdict_is_refused(overrides: dict[str, object],
                                                      match: str) -> None:
    with pytest.raises(InvalidReceiptError, match=match):
        verify_receipt(_verdict(**overrides), PEM)  # type: ignore[arg-type]


_SCAN = {"tensor": "/act/Relu_output_0", "located": "scan", "candidates": 10, "requested": ""}


@pytest.mark.parametrize(("reading", "match"), [
    ({**_SCAN, "tensor": ""}, "names no tensor"),
    ({**_SCAN, "located": "named", "candidates": 3}, "by the layer's name but says 3"),
    ({**_SCAN, "located": "named", "candidates": 1, "requested": "x"}, "by the layer's name"),
    ({**_SCAN, "candidates": 0}, "judged no candidate"),
    ({**_SCAN, "located": "requested"}, "one of 'named', 'scan'"),
    (_SCAN, "corrected for the candidates"),
], ids=["no tensor", "named with candidates", "named with a request", "empty scan",
        "located by request", "uncorrected scan"])
def test_a_verdict_must_say_what_it_read_and_be_corrected_for_a_scan(
        reading: dict[str, object], match: str) -> None:
    """Issue 18, item 3: a verdict names what it read and how it was located; a requested
    tensor is only ever one candidate of a scan, and a scan's p-value carries the factor of
    its candidates (here a test at 1.25e-25 and a verdict p of 1.25e-25 over 10 candidates)."""
    with pytest.raises(InvalidReceiptError, match=match):
        verify_receipt(_verdict(reading=reading), PEM)  # type: ignore[arg-type]


def test_a_corrected_scan_verdict_verifies() -> None:
    corrected = -24.903089986991944 + 1.0  # 10 candidates
    verify_receipt(_verdict(  # type: ignore[arg-type]
        reading={**_SCAN, "requested": "/flatten/Flatten_output_0"},
        p_value=10.0 ** corrected, log10_p_value=corrected), PEM)


_PLAIN = {"name": "plain", "statistic": 30, "n": 256, "p_value": 0.5, "log10_p_value": -0.30103,
          "method": "white-box"}
_LABELS = {"name": "labels", "statistic": 96, "n": 96, "p_value": 1.25e-25,
           "log10_p_value": -24.903089986991944, "method": "output key"}


def test_a_verdict_over_both_key_kinds_must_carry_the_bonferroni_factor() -> None:
    """Issue 19, item 4: a verdict combining a white-box and an output key's tests claims at
    most k × its strongest test's p-value; one that claims the strongest test's alone is
    refused, the corrected one verifies."""
    tests = [_PLAIN, _LABELS]
    with pytest.raises(InvalidReceiptError, match="below 2 × its strongest test's"):
        verify_receipt(_verdict(tests=tests), PEM)  # type: ignore[arg-type]
    corrected = -24.903089986991944 + math.log10(2)
    verify_receipt(_verdict(tests=tests, p_value=10.0 ** corrected,  # type: ignore[arg-type]
                            log10_p_value=corrected), PEM)


def test_verify_suspect_checks_a_scanned_graph_computes_the_tensors_named(tmp_path: Path
                                                                          ) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["/act/Relu_output_0"], name="/act/Relu")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("/act/Relu_output_0", onnx.TensorProto.FLOAT, None)])
    path = tmp_path / "suspect.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = path.read_bytes()
    corrected = -24.903089986991944 + 1.0

    def about(reading: dict[str, object]) -> object:
        return _verdict(suspect_sha256=hashlib.sha256(data).hexdigest(), suspect_size=len(data),
                        reading=reading, p_value=10.0 ** corrected, log10_p_value=corrected)
    verify_suspect(about(_SCAN), path)  # type: ignore[arg-type]
    with pytest.raises(VerificationFailedError, match="computes no tensor 'decoy'"):
        verify_suspect(about({**_SCAN, "tensor": "decoy"}), path)  # type: ignore[arg-type]
    with pytest.raises(VerificationFailedError, match="computes no tensor 'other'"):
        verify_suspect(about({**_SCAN, "requested": "other"}), path)  # type: ignore[arg-type]


def test_a_consistent_verdict_and_a_coarse_one_verify() -> None:
    verify_receipt(_verdict(), PEM)  # type: ignore[arg-type]
    verify_receipt(coarse_log(SIGNER).coarse_verdict(1), PEM)


def test_verify_suspect_compares_sha256_and_size(tmp_path: Path) -> None:
    data = b"a suspect model's bytes" * 100
    right = tmp_path / "suspect.pt2"
    right.write_bytes(data)
    verdict = _verdict(suspect_sha256=hashlib.sha256(data).hexdigest(), suspect_size=len(data))
    verify_suspect(verdict, right)  # type: ignore[arg-type]
    other = tmp_path / "other.pt2"
    other.write_bytes(data + b"x")
    with pytest.raises(VerificationFailedError, match="is not the file this verdict is about"):
        verify_suspect(verdict, other)  # type: ignore[arg-type]
    # Same hash, different size cannot happen for honest files; a verdict claiming it fails.
    lying = _verdict(suspect_sha256=hashlib.sha256(data).hexdigest(), suspect_size=len(data) + 1)
    with pytest.raises(VerificationFailedError, match=f"{len(data) + 1} bytes"):
        verify_suspect(lying, right)  # type: ignore[arg-type]


def test_verify_in_log_against_the_same_size_a_fork_and_a_later_log() -> None:
    entries = [canonical_json(receipt_body(0)), canonical_json(verdict_body(1))]
    log = build_log(entries, SIGNER)
    verdict = log.verdict(1)
    verify_in_log(verdict, log.checkpoint, PEM)
    forked = build_log([canonical_json(receipt_body(0, owner="mallory")), entries[1]], SIGNER)
    with pytest.raises(VerificationFailedError, match="forked"):
        verify_in_log(verdict, forked.checkpoint, PEM)
    older = sign_checkpoint(SIGNER, log.leaves[:1])
    with pytest.raises(VerificationFailedError, match="does not hold entry 1"):
        verify_in_log(verdict, older, PEM)

    grown = build_log([*entries, canonical_json(receipt_body(2))], SIGNER)
    with pytest.raises(InvalidReceiptError, match="give the consistency proof from 2 to 3"):
        verify_in_log(verdict, grown.checkpoint, PEM)
    proof = ConsistencyProof(2, 3, tuple(merkle.consistency_proof(grown.leaves, 2)),
                             grown.checkpoint)
    verify_in_log(verdict, proof, PEM)
    other = build_log([canonical_json(receipt_body(0, owner="mallory")), entries[1],
                       canonical_json(receipt_body(2))], SIGNER)
    bad = ConsistencyProof(2, 3, tuple(merkle.consistency_proof(other.leaves, 2)),
                           other.checkpoint)
    with pytest.raises(VerificationFailedError):
        verify_in_log(verdict, bad, PEM)


@pytest.mark.parametrize("alpha", [1e-12, 3e-10, 1e-9, 1e-6])
def test_the_coarse_bucket_never_straddles_alpha(alpha: float) -> None:
    for log10_p in [-400.0, -60.0, -25.0, -9.5, -9.0, -8.9, -6.0, -1.0, 0.0,
                    math.log10(alpha), math.log10(alpha) + 1e-9]:
        above, at_most = p_value_bucket(log10_p, alpha)
        assert above < at_most and (above == 0.0 or above in (*COARSE_EDGES, alpha))
        assert (log10_p <= math.log10(alpha)) == (at_most <= alpha), (log10_p, at_most)
        assert log10_p <= math.log10(at_most) and (above == 0.0 or log10_p > math.log10(above))


def test_coarse_values_keep_the_decision_and_drop_the_statistics() -> None:
    full = _verdict(p_value=1e-25, log10_p_value=-25.0)
    values = coarse_values(full)  # type: ignore[arg-type]
    assert values["p_value"] == 1e-20 and values["p_value_above"] == 1e-30
    assert values["is_match"] is True and values["outcome"] == "match"
    assert not {"matches", "ber", "tests", "p_value_method", "p_value_binomial"} & set(values)

