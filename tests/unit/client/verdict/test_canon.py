"""Canonicalisation recovers known relabellings, scales and duplications exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freemark.errors import InvalidInputError
from freemark.verdict.canon import align, canonicalise


def _layer(seed: int, probes: int = 300, units: int = 24) -> np.ndarray:
    """ReLU-like activations with independent units."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(probes, units)) @ rng.normal(size=(units, units)), 0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_known_permutation_and_scale_are_recovered_exactly(seed: int) -> None:
    host = _layer(seed)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(host.shape[1])
    scale = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=host.shape[1]))
    suspect = host[:, order] * scale
    matching = align(host, suspect)
    np.testing.assert_array_equal(order[matching.suspect_index], np.arange(host.shape[1]))
    np.testing.assert_allclose(matching.correlation, 1.0, atol=1e-9)


def test_split_units_are_merged_and_dead_units_dropped() -> None:
    host = _layer(3)
    rng = np.random.default_rng(4)
    share = rng.uniform(0.2, 0.8, size=5)
    split = host[:, :5] * share  # the copies of units 0..4
    dead = np.zeros((host.shape[0], 3))
    constant = np.full((host.shape[0], 2), 0.7)  # a unit stuck at its bias
    suspect = np.concatenate([host[:, 5:], dead, host[:, :5] * (1 - share), constant, split], axis=1)
    suspect = suspect[:, rng.permutation(suspect.shape[1])]
    canonical = canonicalise(suspect)
    assert canonical.dead == 5
    assert canonical.merged == 5
    assert canonical.units == host.shape[1]
    matching = align(host, suspect)
    np.testing.assert_allclose(matching.correlation, 1.0, atol=1e-9)


def test_a_sign_flipped_unit_matches_and_a_narrower_suspect_leaves_units_unmatched() -> None:
    host = _layer(5)
    flipped = host.copy()
    flipped[:, 0] *= -2.0
    assert align(host, flipped).correlation[0] == pytest.approx(1.0)
    narrow = align(host, host[:, 4:])
    assert (narrow.suspect_index[:4] == -1).sum() + (narrow.correlation < 1 - 1e-9).sum() >= 4
    assert narrow.count_above(0.999) == host.shape[1] - 4


def test_independent_layers_match_poorly() -> None:
    matching = align(_layer(6), _layer(7))
    assert matching.count_above(0.9) <= 2


def test_bad_activations_get_clear_errors() -> None:
    with pytest.raises(InvalidInputError, match="non-finite"):
        canonicalise(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(InvalidInputError, match="constant"):
        canonicalise(np.ones((10, 4)))
    with pytest.raises(InvalidInputError, match="probes"):
        align(_layer(1, probes=20), _layer(1, probes=30))
