"""p-values: exact for small N, finite for large N, calibrated null is conservative."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from freemark.verdict import (
    fit_betabinomial,
    judge,
    log10_betabinomial_sf,
    log10_binomial_sf,
)


def _exact_binomial_tail(k: int, n: int) -> Fraction:
    return Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2**n)


def _exact_betabinomial_tail(k: int, n: int, a: int, b: int) -> Fraction:
    def beta(x: int, y: int) -> Fraction:  # B(x, y) for positive integers
        return Fraction(math.factorial(x - 1) * math.factorial(y - 1), math.factorial(x + y - 1))

    return sum((math.comb(n, i) * beta(i + a, n - i + b) / beta(a, b) for i in range(k, n + 1)),
               Fraction(0))


@pytest.mark.parametrize("n", [1, 5, 16, 40])
def test_binomial_tail_is_exact_for_small_n(n: int) -> None:
    for k in range(n + 1):
        exact = float(_exact_binomial_tail(k, n))
        assert 10 ** log10_binomial_sf(k, n) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("n,a,b", [(10, 1, 1), (20, 3, 5), (16, 10, 10)])
def test_betabinomial_tail_is_exact_for_small_n(n: int, a: int, b: int) -> None:
    for k in range(n + 1):
        exact = float(_exact_betabinomial_tail(k, n, a, b))
        assert 10 ** log10_betabinomial_sf(k, n, a, b) == pytest.approx(exact, rel=1e-9)


def test_tails_stay_finite_for_n_4096() -> None:
    n = 4096
    assert log10_binomial_sf(n, n) == pytest.approx(-n * math.log10(2), rel=1e-12)
    for k in (0, 2048, 3000, 4096):
        assert math.isfinite(log10_binomial_sf(k, n))
        assert math.isfinite(log10_betabinomial_sf(k, n, 2000.0, 2000.0))


def test_fit_recovers_overdispersion_and_is_conservative() -> None:
    rng = np.random.default_rng(0)
    rates = rng.beta(50, 50, size=5000)
    sample = rng.binomial(256, rates)
    a, b, icc = fit_betabinomial(sample, 256)
    assert icc == pytest.approx(1 / 101, rel=0.15)
    assert a / (a + b) == pytest.approx(0.5, abs=0.01)
    # an under-dispersed or biased-low null never makes the test less conservative than fair coins
    a, b, icc = fit_betabinomial(np.full(100, 100), 256)
    assert a / (a + b) == pytest.approx(0.5) and icc < 1e-9


def test_calibrated_p_is_never_below_binomial_and_reference_rank_floors_it() -> None:
    rng = np.random.default_rng(1)
    key = rng.normal(size=(64, 32))
    bits = (rng.random(64) > 0.5).astype(np.uint8)
    z = rng.normal(size=32)
    z = (z - z.mean()) / np.linalg.norm(z - z.mean())
    verdict = judge(key, bits, z, references=[z, z])
    assert verdict.log10_p_value >= verdict.log10_p_value_binomial
    assert verdict.p_value >= 1.0 - 1e-12  # both references match as well as the suspect
    assert not verdict.is_match
