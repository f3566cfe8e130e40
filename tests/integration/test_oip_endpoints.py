"""The endpoint client against a real Open Inference Protocol server: MLServer, started by
tests/oip_servers.py from its own venv, serving ONNX exports of a digits CNN trained here,
as labels-only and scores endpoints and behind a thief's input preprocessing (Gaussian
noise, 16-level quantisation, a 3x3 median filter). Answers are checked against the same
ONNX file run in-process by onnxruntime, so the client reads exactly what the model says.
One server, five models, per module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from freemark.endpoint import EndpointPolicy, EndpointSession
from freemark_lab.tasks import image_task
from oip_servers import OipServer, ServedModel, export_onnx, serve

ort = pytest.importorskip("onnxruntime")

SHAPE = (1, 8, 8)
POLICY = EndpointPolicy(allow=("127.0.0.1",))
NOISE = {"low": 0.0, "high": 1.0, "sigma": 0.02}


@dataclass(frozen=True)
class World:
    server: OipServer
    onnx: Path
    x: np.ndarray  # natural test digits, float32 in [0, 1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    task = image_task("digits")
    model = task.fit(task.new_model("same", 3), epochs=2, lr=1e-3, seed=3)
    root = tmp_path_factory.mktemp("oip")
    onnx = export_onnx(model, root / "digits.onnx", SHAPE)
    served = [
        ServedModel("digits-scores", onnx, SHAPE, 10, "scores"),
        ServedModel("digits-labels", onnx, SHAPE, 10, "labels"),
        ServedModel("digits-noise", onnx, SHAPE, 10, "labels", "noise", NOISE),
        ServedModel("digits-quantised", onnx, SHAPE, 10, "labels", "quantise", {"levels": 16}),
        ServedModel("digits-median", onnx, SHAPE, 10, "scores", "median"),
    ]
    with serve(served, root / "server") as server:
        print(f"\nMLServer with {len(served)} models ready in {server.started_in_s:.1f} s")
        yield World(server, onnx, np.ascontiguousarray(task.dataset.x_test[:200]))


def _logits(world: World, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(world.onnx), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_labels_and_scores_endpoints_answer_what_the_model_computes(world: World) -> None:
    logits = _logits(world, world.x)
    scores = EndpointSession(world.server.url, "digits-scores", policy=POLICY)
    started = time.monotonic()
    got = scores.answer(world.x)
    elapsed = time.monotonic() - started
    assert scores.kind == "scores" and got.shape == (200, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, _softmax(logits), rtol=1e-5, atol=1e-6)

    labels = EndpointSession(world.server.url, "digits-labels", policy=POLICY)
    assert labels.kind == "labels"
    np.testing.assert_array_equal(labels.answer(world.x), logits.argmax(axis=1))

    meta = labels.metadata()
    assert (meta.name, meta.versions, meta.input.datatype, meta.input.shape) == (
        "digits-labels", (), "FP32", (-1, *SHAPE))  # MLServer lists no versions
    transcript = labels.transcript()
    # Metadata, then 200 inputs and 32 repeats in batches of 64.
    assert [e.method for e in transcript.exchanges] == ["GET"] + ["POST"] * 4
    assert transcript.inputs_sent == 232 and transcript.model_version == "1"
    assert transcript.address == "127.0.0.1" and transcript.endpoint == world.server.url
    assert all(len(e.request_sha256) == len(e.response_sha256) == 64
               for e in transcript.exchanges)
    print(f"200 queries (+32 repeats) as scores in {elapsed:.2f} s")


def test_uint8_queries_are_sent_to_a_float_input_and_answered_alike(world: World) -> None:
    pixels = np.round(world.x * 255).astype(np.uint8)
    labels = EndpointSession(world.server.url, "digits-labels", policy=POLICY).answer(pixels)
    np.testing.assert_array_equal(labels, _logits(world, pixels.astype(np.float32)).argmax(1))


def test_copies_behind_quantisation_and_a_median_filter_answer_through_them(world: World
                                                                             ) -> None:
    from freemark_oip_preprocess import median3x3, quantise

    quantised = EndpointSession(world.server.url, "digits-quantised", policy=POLICY)
    expected = _logits(world, quantise(world.x, levels=16, low=0.0, high=1.0)).argmax(axis=1)
    np.testing.assert_array_equal(quantised.answer(world.x), expected)
    median = EndpointSession(world.server.url, "digits-median", policy=POLICY)
    np.testing.assert_allclose(median.answer(world.x), _softmax(_logits(world,
                                                                        median3x3(world.x))),
                               rtol=1e-5, atol=1e-6)


def test_an_honest_noisy_endpoint_passes_the_consistency_check_on_natural_repeats(world: World
                                                                                 ) -> None:
    clean = _logits(world, world.x).argmax(axis=1)
    noisy = EndpointSession(world.server.url, "digits-noise", policy=POLICY)
    got = noisy.answer(world.x, repeat_from=np.arange(len(world.x)))
    # Noise moves some answers, not most: the copy is still the model.
    assert np.mean(got == clean) > 0.8
