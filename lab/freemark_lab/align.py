"""Aligned extraction: undo unit permutation, per-unit rescaling and dummy units, then judge.

Plain extraction reads the suspect's unit i as the host's unit i, so a free,
function-preserving relabelling of the key layer sends it to BER ½. Here the TTP also
keeps the host's per-trigger activation matrix (the "profile", as secret as the key and
stored encrypted beside it). For a suspect it

1. normalises every unit's profile over the triggers (centre, unit norm), which makes
   the comparison blind to a unit's positive scale;
2. matches each host unit to a distinct suspect unit by greedy maximum correlation
   (no SciPy here; greedy is exact for a relabelled copy, whose correlations are 1);
3. optionally undoes per-unit scale: divides the matched unit by ‖suspect profile‖ /
   ‖host profile‖;
4. reads the key on the aligned activations.

Step 2 is a search over M! relabellings for the one that looks most like the host, and
step 3 copies the host's per-unit magnitudes into the result, so aligned extraction
pulls *every* model towards the host and the plain permutation null is meaningless for
it (aligning a permuted suspect gives the same answer as aligning the suspect). Its null
is therefore calibrated only on independently trained reference models of the same
architecture, aligned the same way; its false-positive rate must be measured on other
independent models, never assumed. Plain extraction stays the scheme's default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freemark.bundle import KeyBundle
from freemark.verdict import (
    DEFAULT_ALPHA,
    Verdict,
    count_matches,
    fit_betabinomial,
    log10_betabinomial_sf,
    log10_binomial_sf,
    suspect_vector,
)

NORM_FLOOR = 1e-12
CONFIDENCE_Z = 1.645  # one-sided 95 %


@dataclass(frozen=True)
class Alignment:
    """Which suspect unit stands for each host unit, and how well their profiles agree."""

    index: np.ndarray  # (host units,) suspect unit matched to each host unit
    correlation: np.ndarray  # (host units,) profile correlation of each matched pair

    @property
    def mean_correlation(self) -> float:
        """1.0 for a relabelled or rescaled copy; lower for anything else."""
        return float(self.correlation.mean())


@dataclass(frozen=True)
class AlignedVerdict:
    """The verdict after alignment, with the alignment's own quality figure."""

    verdict: Verdict
    mean_correlation: float


def unit_profiles(activations: np.ndarray) -> np.ndarray:
    """Each unit's activations over the triggers, centred and scaled to unit norm (dead units: 0)."""
    centred = np.asarray(activations, dtype=np.float64)
    centred = centred - centred.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=0, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > NORM_FLOOR)


def match_units(host_profile: np.ndarray, suspect_activations: np.ndarray) -> Alignment:
    """Greedy one-to-one matching of host units to suspect units by profile correlation.

    Needs at least as many suspect units as host units (dummy units only add candidates).
    """
    host, suspect = unit_profiles(host_profile), unit_profiles(suspect_activations)
    if host.shape[0] != suspect.shape[0]:
        raise ValueError(f"profiles over {host.shape[0]} and {suspect.shape[0]} triggers differ")
    if suspect.shape[1] < host.shape[1]:
        raise ValueError(f"the suspect layer has {suspect.shape[1]} units, fewer than the "
                         f"host's {host.shape[1]}: nothing to align")
    correlation = host.T @ suspect  # (host units, suspect units)
    order = np.argsort(-correlation, axis=None, kind="stable")
    index = np.full(host.shape[1], -1, dtype=np.int64)
    host_free = np.ones(host.shape[1], dtype=bool)
    suspect_free = np.ones(suspect.shape[1], dtype=bool)
    remaining = host.shape[1]
    for flat in order:
        i, j = divmod(int(flat), suspect.shape[1])
        if host_free[i] and suspect_free[j]:
            index[i], host_free[i], suspect_free[j] = j, False, False
            remaining -= 1
            if remaining == 0:
                break
    return Alignment(index=index, correlation=correlation[np.arange(len(index)), index])


def align(suspect_activations: np.ndarray, host_profile: np.ndarray, *,
          rescale: bool = True) -> tuple[np.ndarray, Alignment]:
    """The suspect's activations reordered (and rescaled) into the host's unit order."""
    suspect = np.asarray(suspect_activations, dtype=np.float64)
    alignment = match_units(host_profile, suspect)
    aligned = suspect[:, alignment.index]
    if rescale:
        host_norm = np.linalg.norm(np.asarray(host_profile, dtype=np.float64), axis=0)
        suspect_norm = np.linalg.norm(aligned, axis=0)
        factor = np.divide(host_norm, suspect_norm, out=np.zeros_like(host_norm),
                           where=suspect_norm > NORM_FLOOR)
        aligned = aligned * factor
    return aligned, alignment


def aligned_matches(activations: np.ndarray, bundle: KeyBundle, host_profile: np.ndarray, *,
                    rescale: bool = True) -> tuple[int, Alignment]:
    """Bits of the watermark the key reads from the aligned activations, and the alignment."""
    aligned, alignment = align(activations, host_profile, rescale=rescale)
    z = suspect_vector(aligned, centred=bundle.centred)
    return int(count_matches(bundle.key.astype(np.float64), z, bundle.bits)), alignment


@dataclass(frozen=True)
class AlignedNull:
    """Matches of the key on aligned independent reference models: the aligned test's null."""

    matches: np.ndarray
    rescale: bool


def calibrate(reference_activations: Sequence[np.ndarray], bundle: KeyBundle,
              host_profile: np.ndarray, *, rescale: bool = True) -> AlignedNull:
    """Align each reference model exactly as a suspect would be, and record its matches."""
    if len(reference_activations) < 2:
        raise ValueError("aligned extraction needs at least two reference models for its null")
    matches = [aligned_matches(r, bundle, host_profile, rescale=rescale)[0]
               for r in reference_activations]
    return AlignedNull(matches=np.array(matches, dtype=np.int64), rescale=rescale)


def conservative_sample(matches: np.ndarray) -> np.ndarray:
    """The reference matches shifted to the 95 % upper bound of their mean, spread to that of their variance.

    A moment fit to K ≈ 8 points underestimates the null's tail badly (three references
    gave a copy p = 1e-14 while a held-out independent model reached 1e-2), so the fit is
    made to this sample instead: the mean moves up by a one-sided t bound and the spread
    grows to the chi-square upper bound of the variance (Cornish–Fisher and
    Wilson–Hilferty approximations; SciPy is not a dependency).
    """
    sample = np.asarray(matches, dtype=np.float64)
    dof = len(sample) - 1
    mean, sd = sample.mean(), sample.std(ddof=1)
    t = CONFIDENCE_Z + (CONFIDENCE_Z ** 3 + CONFIDENCE_Z) / (4 * dof)
    h = 2.0 / (9 * dof)
    chi2_low = dof * max(1.0 - h - CONFIDENCE_Z * math.sqrt(h), 1e-3) ** 3
    return mean + t * sd / math.sqrt(len(sample)) + (sample - mean) * math.sqrt(dof / chi2_low)


def aligned_verdict(suspect_activations: np.ndarray, bundle: KeyBundle, host_profile: np.ndarray,
                    null: AlignedNull, *, alpha: float = DEFAULT_ALPHA) -> AlignedVerdict:
    """Judge an aligned suspect against the null of aligned reference models.

    The calibrated p is the larger of the beta-binomial tail fitted (conservatively, see
    `conservative_sample`) to the references' matches and the binomial tail, and never below the suspect's rank among the
    references when one of them matches as many bits (the rule `verdict.judge` uses). The fit
    rests on only K points, which is why the runner measures the false-positive rate on
    held-out independent models rather than trusting the fit.
    """
    n_bits = bundle.n_bits
    matches, alignment = aligned_matches(suspect_activations, bundle, host_profile,
                                         rescale=null.rescale)
    refs = null.matches
    a, b, icc = fit_betabinomial(conservative_sample(refs), n_bits)
    log10_bin = log10_binomial_sf(matches, n_bits)
    log10_p = max(log10_betabinomial_sf(matches, n_bits, a, b), log10_bin)
    beaten_by = int((refs >= matches).sum())
    if beaten_by:
        log10_p = max(log10_p, math.log10((1 + beaten_by) / (1 + len(refs))))
    how = "unit permutation and scale" if null.rescale else "unit permutation"
    method = (f"aligned ({how}); beta-binomial fit to the 95 % bounds of {len(refs)} aligned reference models "
              f"(null mean BER {1 - a / (a + b):.3f}, intra-key correlation {icc:.3g})")
    verdict = Verdict(
        n_bits=n_bits, matches=matches, ber=1.0 - matches / n_bits,
        p_value=10.0 ** log10_p, log10_p_value=log10_p, p_value_method=method,
        p_value_binomial=10.0 ** log10_bin, log10_p_value_binomial=log10_bin,
        alpha=alpha, is_match=log10_p <= math.log10(alpha),
    )
    return AlignedVerdict(verdict=verdict, mean_correlation=alignment.mean_correlation)
