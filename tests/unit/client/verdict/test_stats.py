"""The torch-free statistics: exact tails against brute force, and the panel-calibrated test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from freemark.verdict.stats import (
    binomial_upper_bound,
    log10_bonferroni,
    log10_exceedance_p,
    log10_rank_p,
    log10_sum,
)


def test_clopper_pearson_bound_covers_the_rate() -> None:
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(2000):
        hits = int(rng.binomial(200, 0.03))
        misses += binomial_upper_bound(hits, 200, 0.05) < 0.03
    assert misses / 2000 <= 0.05
    assert binomial_upper_bound(0, 640, 1e-12) == pytest.approx(1 - 1e-12 ** (1 / 640), rel=1e-6)
    assert binomial_upper_bound(5, 5, 0.1) == 1.0


def test_exceedance_p_is_valid_on_a_small_case_by_simulation() -> None:
    """Under the null (suspect and panel units exceed at one rate) P[p ≤ t] ≤ t."""
    rng = np.random.default_rng(1)
    units, panel = 40, 5
    p_values = []
    for _ in range(2000):
        rate = 0.1
        counts = rng.binomial(units, rate, size=panel)
        observed = int(rng.binomial(units, rate))
        hits = int(counts.max()) * panel
        p_values.append(10 ** log10_exceedance_p(observed, units, hits, units * panel))
    p = np.array(p_values)
    for t in (0.01, 0.05, 0.2):
        assert (p <= t).mean() <= t


def test_exceedance_p_reaches_far_for_a_copy_and_is_floored() -> None:
    log10_p = log10_exceedance_p(97, 97, 5 * 12, 5 * 97)
    assert log10_p < -25
    assert log10_p >= -30 + math.log10(29) - 1e-9  # the δ floor, Bonferroni over 29 decades
    assert log10_exceedance_p(0, 97, 0, 485) == 0.0
    assert log10_exceedance_p(10, 97, 5 * 12, 5 * 97) > -2  # like a panel member: no evidence


def test_bonferroni_sum_and_rank() -> None:
    assert log10_bonferroni([-12.0, -3.0]) == pytest.approx(-12 + math.log10(2))
    assert log10_bonferroni([-0.1, -0.2]) == 0.0
    with pytest.raises(ValueError):
        log10_bonferroni([])
    assert 10 ** log10_sum(-2.0, -2.0) == pytest.approx(0.02)
    assert log10_sum(-math.inf, -3.0) == pytest.approx(-3.0)
    assert 10 ** log10_rank_p(5, [1, 5, 7, 2]) == pytest.approx(3 / 5)


def test_binomial_tail_matches_scipy_for_large_n() -> None:
    from freemark.verdict.stats import log10_binomial_sf
    for n, k, p in [(8192, 4500, 0.5), (1000, 30, 0.01), (97, 90, 0.2)]:
        expected = scipy_stats.binom.logsf(k - 1, n, p) / math.log(10)
        assert log10_binomial_sf(k, n, p) == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(log10_binomial_sf(8192, 8192))
