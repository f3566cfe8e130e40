"""Canonicalising a layer's units and matching them to the host's: the structural-obfuscation undo.

A thief can rewrite the key layer without changing the model's function: relabel its units
(permute the producer's rows and the consumer's columns), rescale each unit by a positive
factor across a ReLU, add units that never fire, or split a unit into copies that share its
outgoing weights. Every one of these leaves each surviving unit's *profile* (its activations
over many probe inputs) proportional to a host unit's profile. So, on probe activations:

1. drop dead units: those whose profile is constant (zero or a bias), they carry nothing;
2. merge duplicated or split units: profiles that correlate at ≥ 1 − `MERGE_TOLERANCE` are
   summed into one unit (a split unit's copies add back up to the original);
3. undo per-unit scale: every profile is centred and scaled to unit norm, so correlation
   ignores a unit's positive (or, for layers without a ReLU, negative) factor;
4. match host units one-to-one to suspect units by maximum total |correlation| (the Hungarian
   method, SciPy's `linear_sum_assignment`); the suspect may be wider or narrower.

The result is, per host unit, the |correlation| of its matched suspect unit: ≈ 1 for a unit
the suspect inherited, however it was relabelled, and rarely high for a unit an independent
model learned. `freemark.verdict.aligned` turns those figures into a test. Relabelling any layer
below the key layer leaves its activations unchanged, so aligning the key layer alone covers
permutations anywhere beneath it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from freemark.errors import AlignmentLimitError, InvalidInputError

DEAD_TOLERANCE = 1e-7  # a unit whose profile spread is below this share of the layer's is dead
MERGE_TOLERANCE = 1e-4  # profiles correlating at ≥ 1 − this are one unit split in copies
# The most live units a layer may have to be aligned. Finding split units compares every pair
# of profiles and matching costs host × suspect similarities, so both grow with the square
# of the width; a suspect's width is its author's choice, and the key server aligns in its
# own process. 16,384 covers the MLP of a 1B-parameter decoder (8,192) twice over. The cap
# is on the layer's shape, not its live units: which units are live depends on the probes,
# which are secret, and a refusal must say nothing about them.
MAX_ALIGN_UNITS = 16_384
# Profile pairs compared per block when looking for split units: memory stays at
# `MERGE_BLOCK` × width doubles, whatever the width.
MERGE_BLOCK = 1024


@dataclass(frozen=True)
class CanonicalLayer:
    """A layer's live units after merging duplicates; `profiles` are centred, unit-norm columns."""

    profiles: np.ndarray  # (probes, canonical units)
    live: np.ndarray  # (layer units,) bool: the units kept
    group: np.ndarray  # (live units,) the canonical unit each live unit was merged into

    @property
    def units(self) -> int:
        return self.profiles.shape[1]

    @property
    def dead(self) -> int:
        """Units dropped for a constant profile."""
        return int((~self.live).sum())

    @property
    def merged(self) -> int:
        """Units folded into another because their profiles were proportional."""
        return len(self.group) - self.units

    def merge(self, activations: np.ndarray) -> np.ndarray:
        """Other inputs' activations of this layer, with the same units dropped and summed."""
        x = np.asarray(activations, dtype=np.float64)[:, self.live]
        summed = np.zeros((x.shape[0], int(self.group.max()) + 1))
        np.add.at(summed.T, self.group, x.T)
        return summed


@dataclass(frozen=True)
class Matching:
    """The one-to-one match of host units to suspect units, with each pair's |correlation|."""

    suspect_index: np.ndarray  # (host units,) matched suspect unit, −1 where none was left
    correlation: np.ndarray  # (host units,) |correlation| of the pair, 0 where unmatched
    host: CanonicalLayer
    suspect: CanonicalLayer

    def count_above(self, threshold: float) -> int:
        """How many host units found a suspect unit correlating at ≥ `threshold`."""
        return int((self.correlation >= threshold).sum())


def _unit_columns(activations: np.ndarray) -> np.ndarray:
    centred = activations - activations.mean(axis=0, keepdims=True)
    return centred / np.linalg.norm(centred, axis=0, keepdims=True)


def _proportional_pairs(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (i < j) of unit-norm profiles that correlate at ≥ 1 − `MERGE_TOLERANCE`,
    compared `MERGE_BLOCK` columns at a time so memory stays linear in the width."""
    rows, cols = [], []
    for start in range(0, columns.shape[1], MERGE_BLOCK):
        block = columns[:, start:start + MERGE_BLOCK]
        same = block.T @ columns[:, start:] >= 1.0 - MERGE_TOLERANCE
        r, c = np.nonzero(np.triu(same, k=1))
        rows.append(r + start)
        cols.append(c + start)
    return np.concatenate(rows), np.concatenate(cols)


def canonicalise(activations: np.ndarray) -> CanonicalLayer:
    """Drop dead units, merge proportional ones, and normalise every profile (steps 1–3).

    Raises AlignmentLimitError for a layer of more than `MAX_ALIGN_UNITS` units."""
    x = np.asarray(activations, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InvalidInputError(f"need (probes ≥ 2, units) activations to align, got shape {x.shape}")
    if x.shape[1] > MAX_ALIGN_UNITS:
        raise AlignmentLimitError(f"the layer has {x.shape[1]:,} units; the aligned test "
                                  f"matches layers of at most {MAX_ALIGN_UNITS:,}")
    if not np.all(np.isfinite(x)):
        raise InvalidInputError("the layer produced non-finite activations on the probes")
    spread = x.std(axis=0)
    live = spread > DEAD_TOLERANCE * max(float(spread.max(initial=0.0)), np.finfo(np.float64).tiny)
    x = x[:, live]
    if x.shape[1] == 0:
        raise InvalidInputError("every unit of the layer is constant on the probes: nothing to align")
    columns = _unit_columns(x)
    rows, cols = _proportional_pairs(columns)
    n = x.shape[1]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    groups, label = connected_components(graph, directed=False)
    layer = CanonicalLayer(profiles=columns, live=live, group=label.astype(np.int64))
    if groups < n:
        layer = dataclasses.replace(layer, profiles=_unit_columns(layer.merge(activations)))
    return layer


def match_units(host: CanonicalLayer, suspect: CanonicalLayer) -> Matching:
    """Step 4: the one-to-one match maximising the total |correlation| of matched pairs."""
    if host.profiles.shape[0] != suspect.profiles.shape[0]:
        raise InvalidInputError(f"host and suspect profiles cover {host.profiles.shape[0]} and "
                                f"{suspect.profiles.shape[0]} probes")
    similarity = np.abs(host.profiles.T @ suspect.profiles)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    index = np.full(host.units, -1, dtype=np.int64)
    index[rows] = cols
    correlation = np.zeros(host.units)
    correlation[rows] = similarity[rows, cols]
    return Matching(suspect_index=index, correlation=np.minimum(correlation, 1.0),
                    host=host, suspect=suspect)


def align(host_activations: np.ndarray, suspect_activations: np.ndarray) -> Matching:
    """Canonicalise both layers' probe activations and match the suspect's units to the host's."""
    return match_units(canonicalise(host_activations), canonicalise(suspect_activations))


def aligned_readout(host_probes: np.ndarray, suspect_probes: np.ndarray,
                    suspect_triggers: np.ndarray) -> np.ndarray:
    """The suspect's trigger activations rewritten in the host's unit order and scale.

    Each host unit takes its matched suspect unit through the least-squares line that
    maps one onto the other on the probes; host units that are dead or found no partner
    read as their constant probe mean. This pulls any suspect towards the host, so it is
    only for showing an arbiter how the watermark reads back after alignment (a widened
    copy's BER); no p-value is computed from it.
    """
    host = np.asarray(host_probes, dtype=np.float64)
    matching = align(host, suspect_probes)
    merged_probes = matching.suspect.merge(suspect_probes)
    merged_triggers = matching.suspect.merge(suspect_triggers)
    out = np.tile(host.mean(axis=0), (len(merged_triggers), 1))
    live_units = np.flatnonzero(matching.host.live)
    for unit, group in zip(live_units, matching.host.group, strict=True):
        partner = matching.suspect_index[group]
        if partner < 0:
            continue
        x, y = merged_probes[:, partner], host[:, unit]
        slope = float(np.cov(x, y, bias=True)[0, 1] / max(x.var(), np.finfo(np.float64).tiny))
        out[:, unit] = y.mean() + slope * (merged_triggers[:, partner] - x.mean())
    return out
