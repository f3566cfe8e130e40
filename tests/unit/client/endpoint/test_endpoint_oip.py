"""The protocol's messages on their own: what the metadata makes of an output, and requests
that carry the queries' exact values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from freemark.endpoint.oip import check_inputs, decode_infer, encode_infer, parse_metadata
from freemark.errors import EndpointResponseError
from hostile_endpoints import MODEL, metadata


def _meta(outputs: list[dict[str, object]], output: str | None = None) -> object:
    body = json.dumps({**metadata(), "outputs": outputs}).encode()
    return parse_metadata(body, model=MODEL, output=output, where="test")


@pytest.mark.parametrize(("spec", "kind"), [
    ({"name": "y", "datatype": "INT64", "shape": [-1]}, "labels"),
    ({"name": "y", "datatype": "UINT8", "shape": [-1, 1]}, "labels"),
    ({"name": "y", "datatype": "FP32", "shape": [-1, 10]}, "scores"),
    ({"name": "y", "datatype": "FP16", "shape": [-1, -1]}, "scores"),
])
def test_the_metadata_tells_labels_from_scores(spec: dict[str, object], kind: str) -> None:
    assert _meta([spec]).kind == kind  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", [
    {"name": "y", "datatype": "FP32", "shape": [-1]},  # one float per input: neither
    {"name": "y", "datatype": "INT64", "shape": [-1, 10]},  # integers per class: neither
    {"name": "y", "datatype": "BYTES", "shape": [-1]},
    {"name": "y", "datatype": "FP32", "shape": [-1, 1]},
])
def test_an_output_that_is_neither_is_refused(spec: dict[str, object]) -> None:
    with pytest.raises(EndpointResponseError, match="reads exactly one"):
        _meta([spec])


def test_of_several_readable_outputs_one_must_be_named() -> None:
    both = [{"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    with pytest.raises(EndpointResponseError, match="name it"):
        _meta(both)
    assert _meta(both, output="probs").kind == "scores"  # type: ignore[attr-defined]
    with pytest.raises(EndpointResponseError, match="no single output named 'logits'"):
        _meta(both, output="logits")


@pytest.mark.parametrize("queries", [
    np.array([[0, 255, 3, 1], [7, 8, 9, 200]], np.uint8),
    np.array([[0.1, 2.5, -1e-8, 3.4028235e38]], np.float32),
])
def test_a_request_carries_the_queries_exact_values(queries: np.ndarray) -> None:
    meta = _meta([{"name": "label", "datatype": "INT64", "shape": [-1]}])
    wire = check_inputs(queries, meta, "test")  # type: ignore[arg-type]
    request = json.loads(encode_infer(queries, meta, wire, "r1"))  # type: ignore[arg-type]
    tensor = request["inputs"][0]
    assert (request["id"], tensor["name"], tensor["datatype"]) == ("r1", "x", "FP32")
    sent = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
    np.testing.assert_array_equal(sent, queries.astype(np.float32))
    assert request["outputs"] == [{"name": "label"}]


def test_queries_that_would_not_survive_the_cast_are_refused() -> None:
    meta = _meta([{"name": "label", "datatype": "INT64", "shape": [-1]}])
    with pytest.raises(EndpointResponseError, match="would not survive the cast"):
        check_inputs(np.zeros((2, 4), np.float64), meta, "test")  # type: ignore[arg-type]


def test_labels_come_as_n_or_n_by_one_and_nothing_else() -> None:
    meta = _meta([{"name": "label", "datatype": "INT64", "shape": [-1]}])
    for shape in ([3], [3, 1]):
        reply = {"model_name": MODEL, "outputs": [{"name": "label", "datatype": "INT64",
                                                   "shape": shape, "data": [2, 0, 1]}]}
        got = decode_infer(json.dumps(reply).encode(), meta=meta, request_id="r",  # type: ignore
                           n=3, where="test")
        np.testing.assert_array_equal(got.answers, [2, 0, 1])
    reply["outputs"][0]["shape"] = [1, 3]  # type: ignore[index]
    with pytest.raises(EndpointResponseError, match="shape"):
        decode_infer(json.dumps(reply).encode(), meta=meta, request_id="r", n=3,  # type: ignore
                     where="test")


@pytest.mark.parametrize("queries", [
    np.random.default_rng(0).integers(0, 256, (64, 4), dtype=np.uint8),  # pixels: a table
    np.random.default_rng(1).integers(-3000, 1000, (64, 4)).astype(np.int16),  # a wide span
    np.array([[0.0, -0.0, 1 / 255, 254 / 255]] * 3, np.float32),  # a grid: a table
    np.random.default_rng(2).random((2048, 4), dtype=np.float32),  # 8,192 distinct: json
    # grids found by bucketing: 8-bit pixels over 255 (float16 ones, sent as FP32, too), 256
    # levels across a normalised range, a constant
    *((np.random.default_rng(3).integers(0, 256, (256, 4)) / 255).astype(t)
      for t in (np.float16, np.float32)),
    (-0.4242 + np.random.default_rng(4).integers(0, 256, (256, 4)) * 3.2457 / 255
     ).astype(np.float32),
    np.full((3, 4), 0.5, np.float32),
    # a value one bit off a level shares its bucket: sorted instead
    np.nextafter(np.array([[1 / 255, 2 / 255, 0.0, 1.0]] * 3, np.float32), np.float32(1)),
], ids=["uint8", "int16-span", "float32-grid", "float32-distinct", "float16-pixels",
        "float32-pixels", "float32-normalised", "float32-constant", "float32-off-levels"])
def test_the_numbers_are_the_texts_json_writes(queries: np.ndarray) -> None:
    """The table the encoder writes numbers from (few distinct values) gives the bytes
    json.dumps gives, and so does its fallback; -0.0 stays -0.0."""
    meta = _meta([{"name": "label", "datatype": "INT64", "shape": [-1]}])
    wire = check_inputs(queries, meta, "test")  # type: ignore[arg-type]
    body = encode_infer(queries, meta, wire, "r1")  # type: ignore[arg-type]
    exact = queries if queries.dtype.kind in "iu" else queries.astype(wire)
    expected = json.dumps(exact.reshape(-1).tolist(), separators=(",", ":")).encode()
    assert b'"data":' + expected + b"}" in body


def test_a_query_that_is_not_a_json_number_is_refused() -> None:
    meta = _meta([{"name": "label", "datatype": "INT64", "shape": [-1]}])
    queries = np.array([[0.5, np.nan, 0.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_infer(queries, meta, check_inputs(queries, meta, "test"), "r1")  # type: ignore[arg-type]
