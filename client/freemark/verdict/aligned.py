"""The aligned test: does the suspect carry the host's units, however relabelled, calibrated on a panel?

After `freemark.verdict.canon` has matched the suspect's key-layer units to the host's, the
statistic is T, the number of host units whose matched suspect unit has a probe-profile
|correlation| of at least `THRESHOLD`. A copy keeps most of them (every one, when it was
only relabelled, rescaled or padded); a model trained independently shares a few at most.

How many is "a few" is not assumed: it is measured on the reference panel, independent
models of the same architecture that are canonicalised and matched exactly as the suspect
is. Each panel member contributes one count per host unit, so five members of a 128-unit
layer give 640 observations of the per-unit exceedance rate, which is what lets five
models support α = 1e-9 (a fit to five scalar scores could not). The p-value treats the
host's units as exchangeable trials at the worst panel member's rate, bounded from above
(`freemark.verdict.stats.log10_exceedance_p`), and is never below the suspect's rank among the
panel members when one of them reaches T. Its false-positive rate is measured on held-out
independent models (tests and `docs/scheme.md`), never assumed.

`THRESHOLD` is a constant fixed before any reported model was seen (from measurements on
a public MNIST checkpoint that no test uses); the panel, not the threshold, adapts the
test to a layer where unrelated units correlate strongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freemark.records.types import VerdictTest
from freemark.verdict.canon import align
from freemark.verdict.stats import log10_exceedance_p, log10_rank_p

THRESHOLD = 0.9
MIN_PANEL = 3


@dataclass(frozen=True)
class AlignedTest:
    """The aligned test's figures for one suspect against one panel."""

    matched_units: int  # T: host units matched at |correlation| ≥ THRESHOLD
    host_units: int  # live canonical host units (the trials)
    panel_counts: tuple[int, ...]  # T of every panel member
    log10_p_value: float
    best_log10_p_value: float  # what a perfect copy would get with this panel: the test's reach
    method: str

    @property
    def entry(self) -> VerdictTest:
        """This test's entry in the signed verdict."""
        return VerdictTest(name="aligned", statistic=float(self.matched_units), n=self.host_units,
                           p_value=10.0 ** self.log10_p_value, log10_p_value=self.log10_p_value,
                           method=self.method)


def _log10_p(count: int, units: int, panel_counts: Sequence[int]) -> float:
    worst = max(panel_counts)
    log10_p = log10_exceedance_p(count, units, worst * len(panel_counts), units * len(panel_counts))
    if worst >= count:
        log10_p = max(log10_p, log10_rank_p(count, panel_counts))
    return log10_p


def aligned_test(host_probe_activations: np.ndarray, suspect_probe_activations: np.ndarray,
                 panel_counts: Sequence[int]) -> AlignedTest:
    """Align the suspect to the host and judge its count against the panel members' counts.

    The counts (`matched_units` of each member against this host) depend only on the host
    and the panel, so the key server measures them once, at registration, and a Verify
    aligns one model, the suspect.
    """
    if len(panel_counts) < MIN_PANEL:
        raise ValueError(f"the aligned test needs a panel of at least {MIN_PANEL} independent "
                         f"models, got {len(panel_counts)}")
    counts = tuple(int(c) for c in panel_counts)
    matching = align(host_probe_activations, suspect_probe_activations)
    host_units = matching.host.units
    matched = matching.count_above(THRESHOLD)
    log10_p = _log10_p(matched, host_units, counts)
    best = _log10_p(host_units, host_units, counts)
    method = (f"aligned: {matched} of {host_units} live host units matched at |r| ≥ {THRESHOLD} "
              f"after canonicalising (dead units dropped, duplicates merged, scale and order "
              f"undone); null: the worst of {len(counts)} panel models "
              f"({max(counts)} units), Clopper–Pearson bounded, one-per-decade δ, Bonferroni")
    return AlignedTest(matched_units=matched, host_units=host_units, panel_counts=counts,
                       log10_p_value=log10_p, best_log10_p_value=best, method=method)


def matched_units(host_probe_activations: np.ndarray, suspect_probe_activations: np.ndarray) -> int:
    """T for one model against the host: a panel member's count, or an attacked copy's in the lab."""
    return align(host_probe_activations, suspect_probe_activations).count_above(THRESHOLD)

