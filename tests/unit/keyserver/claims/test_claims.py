"""The claim index's parts: a signature blind to the rewrites a thief gets for free, and an
index over a real SQLite store and real envelopes that ranks by it, leaves out what it
cannot read (so Register checks that registration in full) and catches up from the store."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from freemark_keyserver.claims import PROBES, ClaimIndex, sealed_claim, signature
from freemark_keyserver.claims.signature import DIMENSIONS
from freemark_keyserver.crypto import MasterKeyring
from freemark_keyserver.store import ClaimSignature, Pending, Registration, Store, open_store

GROUP = json.dumps({"float": True, "mask": False, "rank": 4, "shape": [1, 8, 8]},
                   sort_keys=True, separators=(",", ":")).encode()
KEYRING = MasterKeyring({1: bytes(range(32))})


def _layer(seed: int, units: int = 40) -> np.ndarray:
    """A ReLU layer's activations on the probes: a random projection of shared inputs."""
    rng = np.random.default_rng(seed)
    inputs = np.random.default_rng(0).standard_normal((PROBES, 16))
    return np.maximum(inputs @ rng.standard_normal((16, units)) + 0.3, 0.0)


def test_relabelled_rescaled_and_padded_units_keep_the_signature() -> None:
    x = _layer(1)
    rng = np.random.default_rng(2)
    relabelled = x[:, rng.permutation(x.shape[1])]
    rescaled = relabelled * rng.uniform(0.1, 10.0, x.shape[1])
    split = np.concatenate([rescaled[:, :5] * 0.25, rescaled * np.r_[np.full(5, 0.75),
                                                                       np.ones(x.shape[1] - 5)],
                            np.zeros((PROBES, 16))], axis=1)
    own = signature(x)
    assert own is not None and own.shape == (DIMENSIONS,) and own.dtype == np.float32
    for copy in (relabelled, rescaled, split, x * 1e-3):
        found = signature(copy)
        assert found is not None
        np.testing.assert_allclose(found, own, atol=1e-5)
    other = signature(_layer(3))
    assert other is not None and float(other @ own) < 0.99


def test_a_tensor_that_says_too_little_has_no_signature() -> None:
    assert signature(np.zeros((PROBES, 40))) is None  # constant
    assert signature(_layer(1, units=3)) is None  # too few units
    assert signature(_layer(1)[:-1]) is None  # not a probe read
    assert signature(np.full((PROBES, 40), np.nan)) is None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(str(tmp_path / "claims.sqlite3"))
    yield s
    s.close()


def _register(store: Store, rid: str, claim: ClaimSignature | None) -> None:
    record = Registration(rid, "alice", 0, hashlib.sha256(rid.encode()).digest(), b"\x02" * 32,
                          "act", 40, 256, b"\x03" * 32, 1, b"bundle", b"host", -1)
    [entry] = store.append_batch([Pending("register", lambda i, t: json.dumps(
        {"log_index": i, "rid": rid}).encode(), record, claim)])
    assert not isinstance(entry, Exception)


def _claim(rid: str, seed: int, anchor: str = "reg_0") -> ClaimSignature:
    vector = signature(_layer(seed))
    assert vector is not None
    return sealed_claim(KEYRING, rid, "alice", GROUP, anchor, vector)


def test_the_index_ranks_the_nearest_and_catches_up_from_the_store(store: Store) -> None:
    for number in range(20):
        _register(store, f"reg_{number}", _claim(f"reg_{number}", 100 + number))
    index = ClaimIndex(KEYRING)
    index.refresh(store)
    assert len(index) == 20 and index.anchor(GROUP) == "reg_0"
    assert index.groups((4, True, False)) == [(GROUP, "reg_0")]
    assert index.groups((2, True, False)) == []
    copy = signature(_layer(107)[:, ::-1] * 3.0)
    assert copy is not None
    assert index.nearest(GROUP, [copy], k=3)[0] == "reg_7"
    # With nothing to rank by, as many candidates all the same (a Register's time must not
    # tell whether the upload could be read on another owner's triggers).
    assert index.nearest(GROUP, [], k=3) == ["reg_0", "reg_1", "reg_2"]
    assert index.memory_bytes() == 20 * DIMENSIONS * 4
    _register(store, "reg_20", _claim("reg_20", 120))  # another replica's, say
    index.refresh(store)
    assert index.indexed("reg_20") and len(index) == 21


def test_what_the_index_cannot_read_is_left_for_the_full_check(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    _register(store, "reg_0", _claim("reg_0", 1))
    # Sealed for another registration (a swapped row), read on another anchor, or none.
    _register(store, "reg_1", replace(_claim("reg_9", 2), registration_id="reg_1"))
    _register(store, "reg_2", _claim("reg_2", 3, anchor="reg_other"))
    _register(store, "reg_3", None)
    index = ClaimIndex(KEYRING)
    with caplog.at_level(logging.WARNING, logger="freemark_keyserver"):
        index.refresh(store)
    assert [index.indexed(f"reg_{n}") for n in range(4)] == [True, False, False, False]
    assert "ALERT: the claim signature of reg_1 cannot be read" in caplog.text
    assert "reg_2 was read on another anchor" in caplog.text
