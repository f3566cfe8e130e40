"""Probe inputs for aligning a suspect's units to the host's, generated from the triggers alone.

Aligning needs, per unit, a profile: its activations over many inputs, so that a unit and
its relabelled, rescaled or duplicated copy can be recognised by their profiles being
proportional. The triggers are too few for that (tens of inputs: many unrelated units
correlate by chance) and aligning on them is circular, since the same inputs then decide
both the match and the bits. The key server holds nothing but the triggers, so the probes
are derived from them, deterministically, and kept disjoint from them:

- floating-point inputs (images, features): a random convex mix of two triggers, shifted
  by up to two steps along each trailing spatial axis (for inputs with spatial axes), plus
  Gaussian noise of a tenth of the triggers' spread. Mixes cover the space between
  classes, where units differ most; shifts and noise decorrelate nearby probes.
- token inputs: a trigger with a share of its real tokens replaced by tokens drawn from
  the triggers' own real tokens, so every id is one the model has a row for.

The generator is seeded from a hash of the trigger set, so the owner, the TTP and any
arbiter produce the same probes for the same key, and nobody can choose them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from freemark.errors import InvalidInputError
from freemark.triggers import TriggerSet

DEFAULT_PROBES = 1024
MAX_PROBES = 8192
MAX_SHIFT = 2
NOISE_SCALE = 0.1
TOKEN_SWAP_RATE = 0.25


def probe_seed(triggers: TriggerSet, count: int) -> int:
    """The generator seed: SHA-256 over the domain, the count and the trigger arrays."""
    digest = hashlib.sha256(b"freemark/v1/probes")
    digest.update(count.to_bytes(4, "big"))
    for array in (triggers.inputs, triggers.attention_mask):
        if array is not None:
            digest.update(str(array.dtype).encode() + repr(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(digest.digest()[:8], "big")


def make_probes(triggers: TriggerSet, count: int = DEFAULT_PROBES) -> TriggerSet:
    """`count` probe inputs derived from `triggers` (same dtype and shape per input)."""
    if not 1 <= count <= MAX_PROBES:
        raise InvalidInputError(f"probe count must be in [1, {MAX_PROBES}], got {count}")
    rng = np.random.default_rng(probe_seed(triggers, count))
    if np.issubdtype(triggers.inputs.dtype, np.floating):
        return TriggerSet(inputs=_mixed(triggers.inputs, count, rng))
    if np.issubdtype(triggers.inputs.dtype, np.integer):
        inputs, mask = _swapped_tokens(triggers, count, rng)
        return TriggerSet(inputs=inputs, attention_mask=mask)
    raise InvalidInputError(f"cannot make probes for trigger inputs of dtype {triggers.inputs.dtype}")


def _mixed(inputs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(inputs, dtype=np.float64)
    first = rng.integers(len(x), size=count)
    second = rng.integers(len(x), size=count)
    weight = rng.uniform(0.0, 1.0, size=(count,) + (1,) * (x.ndim - 1))
    probes = weight * x[first] + (1.0 - weight) * x[second]
    spatial_axes = tuple(range(max(1, x.ndim - 2), x.ndim)) if x.ndim >= 3 else ()
    for axis in spatial_axes:
        shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=count)
        for i, shift in enumerate(shifts):
            if shift:
                probes[i] = np.roll(probes[i], int(shift), axis=axis - 1)
    spread = float(x.std()) or 1.0
    probes += rng.normal(0.0, NOISE_SCALE * spread, size=probes.shape)
    return probes.astype(inputs.dtype, copy=False)


def _swapped_tokens(triggers: TriggerSet, count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    inputs = np.asarray(triggers.inputs)
    mask = triggers.attention_mask
    real = np.ones(inputs.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    pool = inputs[real]
    if pool.size == 0:
        raise InvalidInputError("the trigger set has no real tokens to make probes from")
    source = rng.integers(len(inputs), size=count)
    probes = inputs[source].copy()
    probe_real = real[source]
    swap = probe_real & (rng.uniform(size=probes.shape) < TOKEN_SWAP_RATE)
    probes[swap] = rng.choice(pool, size=int(swap.sum()))
    probe_mask = None if mask is None else np.asarray(mask)[source].copy()
    return probes, probe_mask
