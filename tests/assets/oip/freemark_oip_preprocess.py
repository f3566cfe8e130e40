"""The input transforms a thief may put in front of a served copy (numpy only).

One definition for both sides: the MLServer runtime (freemark_oip_runtime, in the MLServer
venv) applies them, and the tests (in the project's venv) compute what an honest server
behind them must answer.
"""

from __future__ import annotations

import numpy as np


def quantise(x: np.ndarray, *, levels: int, low: float, high: float) -> np.ndarray:
    """Round every value to one of `levels` evenly spaced values over [low, high]."""
    step = (high - low) / (levels - 1)
    return (np.round((np.clip(x, low, high) - low) / step) * step + low).astype(np.float32)


def median3x3(x: np.ndarray) -> np.ndarray:
    """A 3x3 median filter over the last two axes, edges replicated."""
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, pad, mode="edge"), (3, 3),
                                                       axis=(-2, -1))
    return np.median(windows, axis=(-2, -1)).astype(np.float32)


def noise(x: np.ndarray, *, sigma: float, low: float, high: float,
          rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of standard deviation `sigma`, then clip to [low, high]."""
    return np.clip(x + rng.normal(0.0, sigma, size=x.shape), low, high).astype(np.float32)
