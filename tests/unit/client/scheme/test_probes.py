"""The alignment probes are part of every sealed key: a registration's probe profile was
measured on them, so a later Verify must rebuild exactly the same inputs, wherever it builds
them (the owner's machine, the sandbox child). These digests were taken from the generator
before it was vectorised and chunked; they must never change."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from freemark.scheme import probes
from freemark.scheme.probes import make_probes
from freemark.scheme.triggers import TriggerSet

PINNED = {
    ("image4d", 1): "56449bfe805bac0b", ("image4d", 37): "2357ca0c6d0fdbe3",
    ("image4d", 1024): "0da72375d469258e", ("image3d", 1): "2a216d88042d1de9",
    ("image3d", 37): "f976c919ef365dcc", ("image3d", 1024): "e9119ddb40ed4830",
    ("features", 1): "e33acf4b416490d6", ("features", 37): "c87fc9b89b44bd90",
    ("features", 1024): "a76d45fda09a3f36", ("tokens", 1): "a566f8a4e3decf41",
    ("tokens", 37): "6091f719932bbace", ("tokens", 1024): "eb68d13482f9996f",
}


def _cases() -> dict[str, TriggerSet]:
    rng = np.random.default_rng(7)  # drawn in this order when the digests were taken
    image4d = rng.normal(size=(12, 3, 9, 7)).astype(np.float32)
    image3d = rng.normal(size=(10, 5, 6)).astype(np.float32)
    features = rng.normal(size=(10, 20))
    tokens = rng.integers(0, 500, size=(8, 16))
    mask = (np.arange(16)[None] < rng.integers(4, 17, size=(8, 1))).astype(np.int64)
    return {"image4d": TriggerSet(inputs=image4d), "image3d": TriggerSet(inputs=image3d),
            "features": TriggerSet(inputs=features),
            "tokens": TriggerSet(inputs=tokens, attention_mask=mask)}


def _digest(found: TriggerSet) -> str:
    mask = b"" if found.attention_mask is None else found.attention_mask.tobytes()
    return hashlib.sha256(found.inputs.tobytes() + mask).hexdigest()[:16]


@pytest.mark.parametrize(("name", "count"), sorted(PINNED))
def test_probes_are_the_pinned_ones(name: str, count: int) -> None:
    found = make_probes(_cases()[name], count)
    assert len(found) == count
    assert found.inputs.dtype == _cases()[name].inputs.dtype
    assert _digest(found) == PINNED[(name, count)]


def test_chunking_does_not_change_the_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "_CHUNK_VALUES", 100)  # a few rows per chunk
    for name in ("image4d", "image3d", "features"):
        assert _digest(make_probes(_cases()[name], 37)) == PINNED[(name, 37)]
