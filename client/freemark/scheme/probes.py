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
from freemark.scheme.triggers import TriggerSet

DEFAULT_PROBES = 1024
MIN_PROBES = 2  # a key's profile: one probe has no correlation to align units by
MAX_PROBES = 8192
MAX_SHIFT = 2
NOISE_SCALE = 0.1
TOKEN_SWAP_RATE = 0.25
_CHUNK_VALUES = 1 << 22  # float64 values per chunk of probes (32 MiB)


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


def with_probes(triggers: TriggerSet, count: int) -> TriggerSet:
    """The triggers followed by `count` probes derived from them (the triggers alone for 0),
    so one forward pass reads both. The sandbox builds them itself from the triggers it is
    sent, so a probed request is no larger than the triggers."""
    if count == 0:
        return triggers
    probes = make_probes(triggers, count)
    mask = None
    if triggers.attention_mask is not None and probes.attention_mask is not None:
        mask = np.concatenate([triggers.attention_mask, probes.attention_mask])
    return TriggerSet(inputs=np.concatenate([triggers.inputs, probes.inputs]), attention_mask=mask)


def _mixed(inputs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Mixes, shifts and noise, built `_CHUNK_VALUES` at a time: a 224 x 224 image key's 1,024
    probes are 0.6 GB as float32, and building them whole in float64 took four times that.
    The generator is drawn in the same order as one whole pass would, so the probes do not
    depend on the chunking (tests/unit/client/scheme/test_probes.py pins them)."""
    x = np.asarray(inputs, dtype=np.float64)
    first = rng.integers(len(x), size=count)
    second = rng.integers(len(x), size=count)
    weight = rng.uniform(0.0, 1.0, size=count)
    spatial_axes = tuple(range(max(1, x.ndim - 2), x.ndim)) if x.ndim >= 3 else ()
    shifts = [rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=count) for _ in spatial_axes]
    noise = NOISE_SCALE * (float(x.std()) or 1.0)
    probes = np.empty((count, *x.shape[1:]), dtype=inputs.dtype)
    rows = max(1, _CHUNK_VALUES // max(1, x[0].size))
    for start in range(0, count, rows):
        part = slice(start, min(count, start + rows))
        mix = weight[part].reshape((-1,) + (1,) * (x.ndim - 1))
        chunk = mix * x[first[part]] + (1.0 - mix) * x[second[part]]
        for axis, shift in zip(spatial_axes, shifts):
            chunk = _roll_rows(chunk, shift[part], axis)
        chunk += rng.normal(0.0, noise, size=chunk.shape)
        probes[part] = chunk
    return probes


def _roll_rows(batch: np.ndarray, shifts: np.ndarray, axis: int) -> np.ndarray:
    """`np.roll(batch[i], shifts[i], axis - 1)` for every row i at once."""
    length = batch.shape[axis]
    index = (np.arange(length)[None, :] - shifts[:, None]) % length
    shape = [1] * batch.ndim
    shape[0], shape[axis] = len(shifts), length
    return np.take_along_axis(batch, index.reshape(shape), axis=axis)


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
