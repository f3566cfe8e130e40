"""Judging a suspect: matches, BER, and a p-value calibrated against a realistic null.

docs/design.md §1.1. The naive binomial p-value treats the N extracted bits as independent fair
coins, but every bit reads the same activation vector, so an unrelated model that happens
to correlate with the host flips many bits together. We measure that dependence on a null
sample (the key applied to random permutations of the suspect's own units, plus any
reference models), fit a beta-binomial (an exchangeable correlated-Bernoulli model) to it
by moments, and take its upper tail. The calibrated p-value is never smaller than the
binomial one, and never smaller than the rank of the suspect among reference models.

With a reference panel of at least `aligned.MIN_PANEL` models of the host's width, the
permutation null is not trusted alone: models that share the host's pretraining (other
fine-tunes of one public checkpoint) decode far more bits than a permutation does, and a
beta-binomial fitted mostly to permutations would call every one of them a copy. The plain
p-value is then also bounded by the panel, as the aligned test is: the key's bits are
trials at the worst panel member's agreement rate, bounded above by Clopper–Pearson
(`panel_bound`). An unrelated panel costs a copy little (the bound's floor is ≈ 1e-28.5);
a panel of shared-base models takes away exactly the evidence they share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from freemark.records.schema import signed_fields
from freemark.records.types import (  # Verdict: re-exported
    NO_PANEL,
    Decision,
    ReferencePanel,
    Verdict,
    VerdictTest,
)
from freemark.verdict.aligned import MIN_PANEL
from freemark.verdict.readout import normalise
from freemark.verdict.stats import (
    fit_betabinomial,
    log10_betabinomial_sf,
    log10_binomial_sf,
    log10_bonferroni,
    log10_exceedance_p,
)

DEFAULT_ALPHA = 1e-9
DEFAULT_PERMUTATIONS = 1000
UNIQUENESS_ALPHA = 1e-3
# A coarse verdict names the bucket its p-value falls in between these edges and alpha: the
# strength of the evidence in orders of magnitude a court can weigh, too coarse to steer by.
COARSE_EDGES = (1e-100, 1e-50, 1e-30, 1e-20, 1e-12, 1e-9, 1e-6, 1e-3, 1.0)


def count_matches(key: np.ndarray, z: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Matches of sign(A z) with b; z may be one vector (units,) or many (units, k)."""
    decoded = (key @ z) > 0
    expected = np.asarray(bits, dtype=bool)
    if decoded.ndim == 1:
        return np.asarray((decoded == expected).sum())
    return (decoded == expected[:, None]).sum(axis=0)


def permutation_null(key: np.ndarray, bits: np.ndarray, z: np.ndarray,
                     n_permutations: int = DEFAULT_PERMUTATIONS) -> np.ndarray:
    """Matches of the key on random unit permutations of the suspect's own vector z.

    Seeded from (key, z) so the client and the TTP compute the same null for the same
    suspect. A permuted suspect is a stand-in for an unrelated model of the same shape.
    The permutations are drawn in one call (`Generator.permuted` row by row draws what
    `n_permutations` calls of `Generator.permutation` draw, in the same order, so the null
    is the same as ever), a tenth of the time of a Python loop: Register judges every
    tensor of an upload with every candidate key (issue 21).
    """
    digest = hashlib.sha256(np.ascontiguousarray(key, dtype=np.float64).tobytes()
                            + np.ascontiguousarray(z, dtype=np.float64).tobytes()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    order = rng.permuted(np.broadcast_to(np.arange(len(z)), (n_permutations, len(z))), axis=1)
    return count_matches(key, z[order.T], bits)


def panel_bound(matches: int, n_bits: int, panel_matches: Sequence[int]) -> float:
    """log10 p of `matches` when the panel members matched `panel_matches` of the same bits.

    Bits as exchangeable trials at the worst member's rate, Clopper–Pearson bounded
    (`freemark.verdict.stats.log10_exceedance_p`): one statistic for the plain and the aligned
    test's panels. Meaningful only for a panel of at least `MIN_PANEL` members.
    """
    worst = int(max(panel_matches))
    return log10_exceedance_p(matches, n_bits, worst * len(panel_matches),
                              n_bits * len(panel_matches))


def judge(key: np.ndarray, bits: np.ndarray, z: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
          references: list[np.ndarray] | tuple[np.ndarray, ...] = (),
          n_permutations: int = DEFAULT_PERMUTATIONS) -> Verdict:
    """The verdict for a suspect's normalised vector z (see module docstring for the null)."""
    n_bits = len(bits)
    matches = int(count_matches(key, z, bits))
    perm = permutation_null(key, bits, z, n_permutations)
    ref_matches = np.array([int(count_matches(key, r, bits)) for r in references], dtype=np.int64)
    a, b, icc = fit_betabinomial(np.concatenate([perm, ref_matches]), n_bits)
    log10_bin = log10_binomial_sf(matches, n_bits)
    log10_p = max(log10_betabinomial_sf(matches, n_bits, a, b), log10_bin)
    method = f"beta-binomial fit to {n_permutations} unit permutations of the suspect"
    if len(ref_matches):
        method += f" and {len(ref_matches)} reference models"
        beaten_by = int((ref_matches >= matches).sum())
        if beaten_by:
            log10_p = max(log10_p, math.log10((1 + beaten_by) / (1 + len(ref_matches))))
        if len(ref_matches) >= MIN_PANEL:
            log10_p = max(log10_p, panel_bound(matches, n_bits, ref_matches.tolist()))
            method += (f", bounded by the panel (bits as trials at the worst member's rate, "
                       f"{int(ref_matches.max())} of {n_bits}, Clopper–Pearson)")
    method += f" (null mean BER {1 - a / (a + b):.3f}, intra-key correlation {icc:.3g})"
    is_match = log10_p <= math.log10(alpha)
    plain = VerdictTest(name="plain", statistic=float(matches), n=n_bits, p_value=10.0 ** log10_p,
                        log10_p_value=log10_p, method=method)
    return Verdict(
        n_bits=n_bits,
        matches=matches,
        ber=1.0 - matches / n_bits,
        p_value=10.0 ** log10_p,
        log10_p_value=log10_p,
        p_value_method=method,
        p_value_binomial=10.0 ** log10_bin,
        log10_p_value_binomial=log10_bin,
        alpha=alpha,
        is_match=is_match,
        outcome="match" if is_match else "no_match",
        tests=(plain,),
        panel=NO_PANEL,
    )


def suspect_vector(activations: np.ndarray, *, centred: bool = True) -> np.ndarray:
    """Mean the per-trigger activations and normalise: the z a key reads."""
    return normalise(np.asarray(activations).mean(axis=0), centred=centred)


class Test(Protocol):
    """A test run beside the plain one (the aligned test, and whatever comes next): the entry
    it adds to the signed verdict, and its reach, the p-value a perfect copy would get."""

    @property
    def entry(self) -> VerdictTest: ...

    @property
    def best_log10_p_value(self) -> float: ...


def _listing(names: Sequence[str]) -> str:
    """'the plain and the aligned' / 'the plain, the aligned and the x'."""
    spelled = [f"the {name}" for name in names]
    return spelled[0] if len(spelled) == 1 else ", ".join(spelled[:-1]) + " and " + spelled[-1]


def decide(plain: Verdict, tests: Sequence[Test], panel: Sequence[bytes], *,
           alpha: float, untested: str = "") -> Verdict:
    """The combined verdict: the plain test, and every further test that ran (`tests`, in
    the order they go into the verdict; the aligned test where a panel allowed it).

    With further tests the p-value is the Bonferroni-corrected minimum (k × the smallest p
    over k tests), valid however the tests depend on each other. A non-match whose tests
    could not have shown a match at α even for a perfect copy (plain p = 1, every other test
    at its reach) is `inconclusive`, not `no_match`; so is one where a panel was given but
    no further test ran (a panel below `aligned.MIN_PANEL`). `untested` says why the aligned
    test did not run (noted in the method; without further tests the plain verdict is then
    the decision). A new test is a module that
    returns a `Test` and one more entry in `freemark.extract.judge_activations`' list: this
    function does not change.
    """
    record = ReferencePanel.of(panel) if panel else NO_PANEL
    threshold = math.log10(alpha)
    note = f"; relabelling not tested ({untested})" if untested else ""
    if not tests:
        is_match = plain.log10_p_value <= threshold
        outcome = "match" if is_match else ("inconclusive" if panel else "no_match")
        return dataclasses.replace(plain, p_value_method=plain.p_value_method + note,
                                   is_match=is_match, outcome=outcome, panel=record)
    entries = [test.entry for test in tests]
    log10_p = log10_bonferroni([plain.log10_p_value, *(e.log10_p_value for e in entries)])
    is_match = log10_p <= threshold
    # Could these tests have caught a copy the plain test misses (plain p = 1, the rest at
    # their best)?
    reach = log10_bonferroni([0.0, *(test.best_log10_p_value for test in tests)])
    outcome = "match" if is_match else ("inconclusive" if reach > threshold else "no_match")
    k = len(entries) + 1
    over = _listing(["plain", *(e.name for e in entries)])
    method = (f"Bonferroni over {over} test{'s' if k > 2 else ''} ({k} × the "
              f"{'smaller' if k == 2 else 'smallest'} p); plain: {plain.p_value_method}; "
              + "; ".join(e.method for e in entries) + note)
    return dataclasses.replace(plain, p_value=10.0 ** log10_p, log10_p_value=log10_p,
                               p_value_method=method, is_match=is_match, outcome=outcome,
                               tests=(*plain.tests, *entries), panel=record)


def strongest_of(verdicts: Sequence[Verdict], *, candidates: int, alpha: float
                 ) -> tuple[int, Verdict]:
    """The verdict on a suspect whose key layer the key server located by scanning it: the
    strongest of the `verdicts` (one per candidate tensor judged; the first on a tie), with
    its p-value Bonferroni-corrected over all `candidates` (those listed but not judged
    count too: a valid bound however the tensors depend on each other), and the index of
    the one chosen.

    Scanning K tensors of an independent model gives K chances at a small p; K × the
    smallest p is a valid p-value for "some tensor carries the key", so reading more cannot
    make a match. The outcome is `inconclusive` when any candidate's verdict is (its tests
    could not have reached alpha, so no tensor can be cleared by it)."""
    if not verdicts or candidates < len(verdicts):
        raise ValueError("a scan's verdict needs at least one judged candidate, and "
                         "candidates >= the verdicts judged")
    chosen = min(range(len(verdicts)), key=lambda i: verdicts[i].log10_p_value)
    best = verdicts[chosen]
    log10_p = min(0.0, best.log10_p_value + math.log10(candidates))
    is_match = log10_p <= math.log10(alpha)
    unreachable = any(v.outcome == "inconclusive" for v in verdicts)
    outcome = "match" if is_match else ("inconclusive" if unreachable else "no_match")
    method = (f"the strongest of {candidates} candidate tensors the key server's scan located, "
              f"Bonferroni over them ({candidates} × its p); {best.p_value_method}")
    return chosen, dataclasses.replace(best, p_value=10.0 ** log10_p, log10_p_value=log10_p,
                                       p_value_method=method, is_match=is_match,
                                       outcome=outcome)


def p_value_bucket(log10_p: float, alpha: float) -> tuple[float, float]:
    """(above, at_most]: the coarse bucket of a p-value given as log10 (it may underflow).

    The edges are `COARSE_EDGES` and `alpha`, so at_most <= alpha exactly when p <= alpha and
    the bucket agrees with the decision; the lowest bucket starts at 0.
    """
    edges = sorted({0.0, alpha, *COARSE_EDGES})
    for above, at_most in itertools.pairwise(edges):
        if log10_p <= math.log10(at_most):
            return above, at_most
    return edges[-2], edges[-1]  # p = 1 exactly, or a rounding above it


def coarse_values(verdict: Verdict) -> dict[str, Any]:
    """The judgement fields of a `CoarseVerdict` for `verdict`: its decision, with the
    p-value replaced by the upper edge of its bucket and the lower edge beside it."""
    above, at_most = p_value_bucket(verdict.log10_p_value, verdict.alpha)
    decision = {spec.name: getattr(verdict, spec.name) for spec in signed_fields(Decision)}
    return {**decision, "p_value": at_most, "log10_p_value": math.log10(at_most),
            "p_value_above": above}
