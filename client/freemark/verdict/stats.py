"""The statistics a verdict rests on, free of torch: exact tails in log space, bounds, corrections.

Every p-value the project reports comes from here, so the client, the key server and the
lab compute the same number for the same evidence. Tails are summed exactly in log space
with SciPy's special functions (`gammaln`, `betaln`, `logsumexp`), which keeps them finite
and exact for N up to 8,192 bits, far below where a float64 p-value would underflow to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import betainccinv, betaln, gammaln, logsumexp

LN10 = math.log(10.0)

# Confidence levels tried by `log10_exceedance_p`, one per decade (δ in the module notes).
BOUND_DECADES = tuple(range(2, 31))


def _log_choose(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def _tail(k: int, n: int, log_pmf: np.ndarray) -> float:
    return min(0.0, float(logsumexp(log_pmf)) / LN10)


def log10_binomial_sf(k: int, n: int, p: float = 0.5) -> float:
    """log10 P[X ≥ k] for X ~ Binomial(n, p); exact, finite for any n ≤ 8192."""
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    i = np.arange(k, n + 1, dtype=np.float64)
    return _tail(k, n, _log_choose(n, i) + i * math.log(p) + (n - i) * math.log1p(-p))


def log10_betabinomial_sf(k: int, n: int, a: float, b: float) -> float:
    """log10 P[X ≥ k] for X ~ BetaBinomial(n, a, b); exact sum in log space."""
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    i = np.arange(k, n + 1, dtype=np.float64)
    return _tail(k, n, _log_choose(n, i) + betaln(i + a, n - i + b) - betaln(a, b))


def fit_betabinomial(null_matches: np.ndarray, n_bits: int) -> tuple[float, float, float]:
    """Moment fit (rate, icc) → (a, b, icc); rate clipped to ≥ ½ and icc to ≥ 0 (conservative)."""
    sample = np.asarray(null_matches, dtype=np.float64)
    rate = min(max(sample.mean() / n_bits, 0.5), 1.0 - 1e-9)
    variance = sample.var(ddof=1) if len(sample) > 1 else 0.0
    binomial_var = n_bits * rate * (1.0 - rate)
    icc = (variance / binomial_var - 1.0) / (n_bits - 1) if binomial_var > 0 else 0.0
    icc = min(max(icc, 1e-12), 1.0 - 1e-9)
    scale = 1.0 / icc - 1.0
    return rate * scale, (1.0 - rate) * scale, icc


def binomial_upper_bound(successes: int, trials: int, delta: float) -> float:
    """Clopper–Pearson upper bound: P[true rate > bound] ≤ δ, whatever the true rate."""
    if trials <= 0:
        return 1.0
    if successes >= trials:
        return 1.0
    # The upper δ-quantile of Beta(k + 1, n − k), computed from the upper tail so that
    # δ far below float64's epsilon keeps its meaning.
    return float(betainccinv(successes + 1, trials - successes, delta))


def log10_exceedance_p(observed: int, units: int, null_hits: int, null_trials: int) -> float:
    """log10 p that `observed` of `units` exceed a threshold, when `null_hits` of `null_trials`
    null units did.

    The per-unit null rate q is unknown; the panel only bounds it. For a fixed δ,
    p_δ = δ + P[Binomial(units, q⁺_δ) ≥ observed], with q⁺_δ the Clopper–Pearson bound,
    is a valid p-value (either q > q⁺_δ, probability ≤ δ, or the tail is conservative).
    We take the best δ of one per decade (10⁻² … 10⁻³⁰) and pay for the choice with a
    Bonferroni factor of their number, so the result is still valid. Its floor is therefore
    about 29 × 10⁻³⁰: the aligned test never claims more than a panel can support.
    """
    if observed <= 0:
        return 0.0
    if observed > units:
        return -math.inf
    log10_delta = -np.array(BOUND_DECADES, dtype=np.float64)
    if null_hits >= null_trials:
        return 0.0
    bound = np.minimum(betainccinv(null_hits + 1, null_trials - null_hits, 10.0 ** log10_delta),
                       1.0 - 1e-15)
    i = np.arange(observed, units + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_pmf = (_log_choose(units, i)[None, :] + i[None, :] * np.log(bound)[:, None]
                   + (units - i)[None, :] * np.log1p(-bound)[:, None])
    tails = np.minimum(logsumexp(log_pmf, axis=1) / LN10, 0.0)
    combined = np.logaddexp(log10_delta * LN10, tails * LN10) / LN10
    return min(0.0, float(combined.min()) + math.log10(len(BOUND_DECADES)))


def log10_sum(*log10_values: float) -> float:
    """log10 of a sum of values given as log10s."""
    finite = [v for v in log10_values if v != -math.inf]
    if not finite:
        return -math.inf
    return float(logsumexp(np.array(finite) * LN10)) / LN10


def log10_bonferroni(log10_p_values: Sequence[float]) -> float:
    """log10 of the Bonferroni-corrected minimum: valid whatever the tests' dependence."""
    if not log10_p_values:
        raise ValueError("no p-values to combine")
    return min(0.0, min(log10_p_values) + math.log10(len(log10_p_values)))


def log10_rank_p(observed: float, null: Sequence[float]) -> float:
    """log10 of (1 + #null ≥ observed) / (1 + #null): the exact permutation-style p-value."""
    sample = np.asarray(null, dtype=np.float64)
    beaten_by = int((sample >= observed).sum())
    return math.log10((1 + beaten_by) / (1 + len(sample)))
