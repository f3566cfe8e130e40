"""The output tests: what a suspect answers on an output key's queries, judged against a null
fitted on held-out panel models (docs/blackbox.md).

An output key's items each carry a claim the host makes and an independent model should not:

- `labels`: the top-1 label of query i is its target class t_b (all an endpoint that returns
  labels gives);
- `scores`: score[t_b] > score[o], o the query's second target class;
- `ranking`: on a natural image, never perturbed, the order of the host's top four classes
  (a thief cannot filter these out as adversarial inputs).

The statistic is the count of items a suspect answers as the host does. Its null is not
assumed: items are derived in two folds, each against half of the reference panel, so every
panel member is held out for the other fold, and its count there is an observation of what an
independent model does on queries it never shaped. A beta-binomial (an exchangeable
correlated-Bernoulli model: each model has its own agreement rate, drawn from a Beta) is
fitted to those held-out counts (`fit_null`); never binomial(½), which ignores that queries
transfer between models together and put one independent at 10^-7.4 in the prototype.

Every function takes plain numpy arrays (the panel's answers, the folds), so a verifier can
re-fit the null from answers it collected itself: an owner's claimed null is never trusted.
Three choices keep the fit conservative with eight panel members: the agreement rate enters
at its upper `MEAN_CONFIDENCE` bound, never below `MIN_RATE`, and the intra-model correlation
is never below `MIN_ICC` (a heavier tail than the panel shows). Both are measured for their cost in `docs/blackbox.md` (calibration on held-out
independents).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freemark.records.types import NO_PANEL, ReferencePanel, Verdict, VerdictTest
from freemark.verdict.decision import decide
from freemark.verdict.stats import (
    binomial_upper_bound,
    log10_betabinomial_sf,
    log10_binomial_sf,
)

__all__ = ["MEAN_CONFIDENCE", "MIN_ICC", "MIN_RATE", "RANK_DEPTH", "BetaBinomialNull",
           "OutputTest", "decide_outputs", "fit_null", "held_out_counts", "label_successes",
           "output_test", "ranking_successes", "score_successes"]

MEAN_CONFIDENCE = 0.95
MIN_ICC = 0.01
MIN_RATE = 1e-3
RANK_DEPTH = 4  # the ranking statistic reads the order of the host's top four classes


@dataclass(frozen=True)
class BetaBinomialNull:
    """The fitted null: each independent model agrees on an item with a rate p ~ Beta(a, b)."""

    a: float
    b: float
    counts: tuple[int, ...]  # the held-out counts it was fitted to
    trials: tuple[int, ...]  # items behind each count

    @property
    def rate(self) -> float:
        """The null's mean agreement rate a / (a + b)."""
        return self.a / (self.a + self.b)

    @property
    def icc(self) -> float:
        """Correlation between two items of one model: 1 / (a + b + 1)."""
        return 1.0 / (self.a + self.b + 1.0)

    def log10_sf(self, count: int, n: int) -> float:
        """log10 P[X ≥ count], X ~ BetaBinomial(n, a, b): the one-sided p-value."""
        return log10_betabinomial_sf(count, n, self.a, self.b)

    def describe(self) -> str:
        """One line for a verdict's method."""
        return (f"beta-binomial fitted to {len(self.counts)} held-out panel counts "
                f"({', '.join(f'{c}/{t}' for c, t in zip(self.counts, self.trials, strict=True))}"
                f"): rate {self.rate:.4f} (upper {MEAN_CONFIDENCE:.0%} bound), "
                f"intra-model correlation {self.icc:.3g} (≥ {MIN_ICC})")


def held_out_counts(successes: np.ndarray, folds: np.ndarray, member_folds: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(count, trials) of every panel member on the fold it did not shape.

    `successes` is (members, items) bool, `folds` the fold (0 or 1) of every item, and
    `member_folds` the fold each member was used to derive; a member is held out on items of
    the other fold.
    """
    hits = np.asarray(successes, dtype=bool)
    folds = np.asarray(folds)
    member_folds = np.asarray(member_folds)
    if hits.ndim != 2 or hits.shape != (len(member_folds), len(folds)):
        raise ValueError(f"successes of shape {hits.shape} do not fit {len(member_folds)} "
                         f"members and {len(folds)} items")
    held = folds[None, :] != member_folds[:, None]
    return (hits & held).sum(axis=1), held.sum(axis=1)


def fit_null(counts: Sequence[int] | np.ndarray, trials: Sequence[int] | np.ndarray
             ) -> BetaBinomialNull:
    """A beta-binomial fitted to held-out counts by moments, made conservative.

    The agreement rate is the upper `MEAN_CONFIDENCE` Clopper–Pearson bound of the pooled
    held-out rate (at least `MIN_RATE`); the intra-model correlation is the moment estimate
    from the counts' spread at that rate, never below `MIN_ICC`. Moments rather than
    maximum likelihood: with eight counts all at zero the likelihood runs to a correlation
    of one, a null that would clear every copy. The spread enters at its point estimate: an
    upper confidence bound on it (sample variance over a χ² quantile, 3.2× for eight
    counts) turns the Beta's tail polynomial enough that no copy reaches 1e-9 with 256
    queries when the panel's two architectures differ by a few counts; the calibration on
    held-out independents (docs/blackbox.md) is what says the point estimate is safe.
    """
    c = np.asarray(counts, dtype=np.int64)
    n = np.asarray(trials, dtype=np.int64)
    if len(c) < 2 or len(c) != len(n) or np.any(n <= 0) or np.any(c < 0) or np.any(c > n):
        raise ValueError("the null needs at least two held-out counts, each within its trials")
    rate = max(binomial_upper_bound(int(c.sum()), int(n.sum()), 1.0 - MEAN_CONFIDENCE), MIN_RATE)
    rate = min(rate, 1.0 - 1e-9)
    size = float(n.mean())
    spread = float((c / n).var(ddof=1))
    # Var(count / n) = r(1 − r)(1 + (n − 1)ρ) / n for a beta-binomial of correlation ρ.
    icc = (spread * size / (rate * (1.0 - rate)) - 1.0) / (size - 1.0) if size > 1 else 0.0
    icc = min(max(icc, MIN_ICC), 1.0 - 1e-9)
    scale = 1.0 / icc - 1.0
    return BetaBinomialNull(a=rate * scale, b=(1.0 - rate) * scale,
                            counts=tuple(int(v) for v in c), trials=tuple(int(v) for v in n))


def label_successes(labels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Top-1 label equals the target class; labels (..., items) ints."""
    return np.asarray(labels) == np.asarray(targets)


def score_successes(scores: np.ndarray, targets: np.ndarray, others: np.ndarray) -> np.ndarray:
    """score[target] > score[other] on every item; scores (..., items, classes)."""
    s = np.asarray(scores)
    items = np.arange(s.shape[-2])
    return s[..., items, np.asarray(targets)] > s[..., items, np.asarray(others)]


def ranking_successes(scores: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """The classes in `orders` (items, RANK_DEPTH), the host's top classes best first, come
    out in strictly decreasing score; scores (..., items, classes)."""
    s = np.asarray(scores)
    items = np.arange(s.shape[-2])[:, None]
    ranked = s[..., items, np.asarray(orders)]  # (..., items, depth)
    return np.all(np.diff(ranked, axis=-1) < 0, axis=-1)


@dataclass(frozen=True)
class OutputTest:
    """One output statistic for one suspect against one fitted null (a `decision.Test`)."""

    name: str  # "labels", "scores" or "ranking"
    count: int
    n: int
    null: BetaBinomialNull

    @property
    def log10_p_value(self) -> float:
        """One-sided: P[X ≥ count] under the null."""
        return self.null.log10_sf(self.count, self.n)

    @property
    def best_log10_p_value(self) -> float:
        """The test's reach: the p-value of a suspect that answers every item as the host."""
        return self.null.log10_sf(self.n, self.n)

    @property
    def entry(self) -> VerdictTest:
        """This test's entry in the signed verdict."""
        log10_p = self.log10_p_value
        method = f"{self.name}: {self.count} of {self.n} items answered as the host; null: " \
                 + self.null.describe()
        return VerdictTest(name=self.name, statistic=float(self.count), n=self.n,
                           p_value=10.0 ** log10_p, log10_p_value=log10_p, method=method)


def output_test(name: str, suspect: np.ndarray, panel: np.ndarray, folds: np.ndarray,
                member_folds: np.ndarray) -> OutputTest:
    """The suspect's successes (items,) judged against the panel's (members, items)."""
    hits = np.asarray(suspect, dtype=bool)
    if hits.shape != (len(folds),):
        raise ValueError(f"{len(hits)} answers for {len(folds)} items")
    counts, trials = held_out_counts(panel, folds, member_folds)
    return OutputTest(name=name, count=int(hits.sum()), n=len(hits), null=fit_null(counts, trials))


def decide_outputs(tests: Sequence[OutputTest], panel: Sequence[bytes], *, alpha: float
                   ) -> Verdict:
    """The verdict of an output key alone: the first test (labels) stands where the plain
    test stands in `decision.decide`, the rest are combined with it under its Bonferroni
    correction; `panel` (the fingerprints the null came from) is recorded in the verdict."""
    if not tests:
        raise ValueError("no output test to decide on")
    first = tests[0]
    log10_p = first.log10_p_value
    log10_binomial = log10_binomial_sf(first.count, first.n, first.null.rate)
    entry = first.entry
    plain = Verdict(n_bits=first.n, matches=first.count, ber=1.0 - first.count / first.n,
                    p_value=10.0 ** log10_p, log10_p_value=log10_p, p_value_method=entry.method,
                    p_value_binomial=10.0 ** log10_binomial,
                    log10_p_value_binomial=log10_binomial, alpha=alpha,
                    is_match=log10_p <= math.log10(alpha), tests=(entry,))
    # decide() reads a panel with no further test as an aligned test that could not run
    # (inconclusive); an output verdict's panel is the null's source, recorded either way.
    verdict = decide(plain, list(tests[1:]), panel if len(tests) > 1 else (), alpha=alpha)
    record = ReferencePanel.of(panel) if panel else NO_PANEL
    return dataclasses.replace(verdict, panel=record)
