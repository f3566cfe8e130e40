"""Canonicalisation recovers known relabellings, scales and duplications exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freemark.errors import AlignmentLimitError, InvalidInputError
from freemark.verdict import canon
from freemark.verdict.canon import MAX_ALIGN_UNITS, MERGE_BLOCK, align, canonicalise


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


def test_split_units_in_different_blocks_are_merged() -> None:
    """The pairwise search runs `MERGE_BLOCK` profiles at a time; a unit split into copies
    that land in different blocks (and in the same one) still adds back up to one."""
    rng = np.random.default_rng(7)
    width = 2 * MERGE_BLOCK + 50
    host = np.maximum(rng.normal(size=(64, width)), 0.0)
    suspect = host.copy()
    suspect[:, 2 * MERGE_BLOCK + 10] = 0.3 * host[:, 3]  # a copy of unit 3, two blocks on
    suspect[:, 3] *= 0.7
    suspect[:, MERGE_BLOCK + 1] = 0.5 * host[:, MERGE_BLOCK]  # a copy of its block neighbour
    suspect[:, MERGE_BLOCK] *= 0.5
    layer = canonicalise(suspect)
    assert layer.merged == 2
    assert layer.group[3] == layer.group[2 * MERGE_BLOCK + 10]
    assert layer.group[MERGE_BLOCK] == layer.group[MERGE_BLOCK + 1]


def test_a_layer_wider_than_the_cap_is_refused_by_its_shape_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any profile is compared (the refusal depends on the shape, never on
    which units the secret probes make live), and not as an unreadable layer: a scan skips
    those, and must not skip a layer widened past the cap."""
    monkeypatch.setattr(canon, "MAX_ALIGN_UNITS", 32)
    dead_padding = np.zeros((40, 33))
    dead_padding[:, :5] = _layer(1, probes=40, units=5)
    with pytest.raises(AlignmentLimitError, match="33 units") as refused:
        canonicalise(dead_padding)
    assert not isinstance(refused.value, InvalidInputError)
    assert canonicalise(dead_padding[:, :32]).units == 5
    assert MAX_ALIGN_UNITS >= 2 * 8192  # a 1B-parameter decoder's MLP, twice over
