"""The output tests' statistics: the held-out null, its fit, the p-values and their combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import betabinom

from freemark.verdict.decision import decide
from freemark.verdict.outputs import (
    MIN_ICC,
    OutputTest,
    decide_outputs,
    fit_null,
    held_out_counts,
    label_successes,
    output_test,
    ranking_successes,
    score_successes,
)
from freemark.verdict.stats import log10_bonferroni


def test_fit_recovers_known_betabinomial_draws_conservatively() -> None:
    rng = np.random.default_rng(0)
    a, b, n = 2.0, 38.0, 128  # rate 0.05, icc ≈ 0.024
    counts = betabinom.rvs(n, a, b, size=400, random_state=rng)
    null = fit_null(counts, np.full(400, n))
    assert null.rate == pytest.approx(0.05, abs=0.01)
    assert null.rate >= counts.sum() / (400 * n)  # the upper bound, never the point estimate
    assert null.icc == pytest.approx(1 / (a + b + 1), rel=0.35)
    # The tail is the truth's (scipy's betabinom) where a copy lands, up to the fit's noise.
    assert null.log10_sf(40, n) == pytest.approx(math.log10(betabinom.sf(39, n, a, b)), abs=0.5)


def test_few_counts_keep_the_floors() -> None:
    null = fit_null([0, 0, 0, 0], [64, 64, 64, 64])
    assert null.icc >= MIN_ICC and null.rate > 0
    assert null.log10_sf(0, 128) == 0.0
    assert null.log10_sf(128, 128) < -9  # a perfect copy can still reach alpha


def test_p_values_are_calibrated_on_draws_from_the_null() -> None:
    rng = np.random.default_rng(1)
    a, b, n = 3.0, 27.0, 64
    null = fit_null(betabinom.rvs(n, a, b, size=8, random_state=rng), np.full(8, n))
    fresh = betabinom.rvs(n, a, b, size=2000, random_state=rng)
    p = np.array([10 ** null.log10_sf(int(k), n) for k in fresh])
    assert (p <= 0.01).mean() <= 0.03  # no more false positives than the level (up to noise)


def test_refuses_an_unusable_null() -> None:
    with pytest.raises(ValueError):
        fit_null([3], [10])
    with pytest.raises(ValueError):
        fit_null([11, 2], [10, 10])


def test_held_out_counts_read_only_the_fold_a_member_did_not_shape() -> None:
    successes = np.array([[1, 1, 0, 0], [1, 0, 1, 1]], dtype=bool)
    folds = np.array([0, 1, 0, 1])
    counts, trials = held_out_counts(successes, folds, np.array([0, 1]))
    assert counts.tolist() == [1, 2] and trials.tolist() == [2, 2]


def test_the_three_statistics() -> None:
    scores = np.array([[0.1, 0.7, 0.2, 0.0, -1.0], [0.5, 0.1, 0.2, 0.3, 0.4]])
    assert label_successes(scores.argmax(1), np.array([1, 1])).tolist() == [True, False]
    assert score_successes(scores, np.array([2, 2]), np.array([0, 1])).tolist() == [True, True]
    orders = np.array([[1, 2, 0, 3], [0, 4, 3, 2]])
    assert ranking_successes(scores, orders).tolist() == [True, True]
    assert ranking_successes(scores, orders[:, [1, 0, 2, 3]]).tolist() == [False, False]
    tied = np.array([[0.0, 1.0, 1.0, 0.5, 0.2]])
    assert not ranking_successes(tied, np.array([[1, 2, 3, 4]]))[0]  # ties never count


def _test(count: int, n: int = 64) -> OutputTest:
    return OutputTest(name="labels", count=count, n=n, null=fit_null([2, 5, 3, 4], [n] * 4))


def test_output_test_and_verdict() -> None:
    panel = np.zeros((4, 8), dtype=bool)
    test = output_test("labels", np.ones(8, dtype=bool), panel, np.arange(8) % 2,
                       np.array([0, 1, 0, 1]))
    assert test.count == 8 and test.entry.name == "labels"
    copy, independent = _test(60), _test(4)
    verdict = decide_outputs([copy], [b"\x01" * 32] * 8, alpha=1e-9)
    assert verdict.outcome == "match" and verdict.log10_p_value == copy.log10_p_value
    assert verdict.panel.size == 8
    assert decide_outputs([independent], [b"\x01" * 32] * 8, alpha=1e-9).outcome == "no_match"


def test_several_statistics_combine_under_the_decisions_bonferroni() -> None:
    labels, scores = _test(60), _test(30)
    verdict = decide_outputs([labels, scores], [b"\x02" * 32] * 8, alpha=1e-9)
    expected = log10_bonferroni([labels.log10_p_value, scores.log10_p_value])
    assert verdict.log10_p_value == pytest.approx(expected)
    assert [t.name for t in verdict.tests] == ["labels", "labels"]
    # An output test is a `decision.Test`: it joins a white-box verdict the same way.
    plain = decide_outputs([_test(4)], [], alpha=1e-9)
    combined = decide(plain, [labels], [], alpha=1e-9)
    assert combined.log10_p_value == pytest.approx(
        log10_bonferroni([plain.log10_p_value, labels.log10_p_value]))
