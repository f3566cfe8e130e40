"""Reading a layer the way a key does: the normalised mean-activation vector z, torch-free.

Shared by derivation (keygen), extraction and the key server's judgement, so every side
reads the same z from the same activations.
"""

from __future__ import annotations

import numpy as np

from freemark.errors import InvalidInputError

NORM_FLOOR = 1e-12


def normalise(mean_activation: np.ndarray, *, centred: bool = True) -> np.ndarray:
    """z = (f̄ − mean(f̄)) / ‖f̄ − mean(f̄)‖: blind to global scale, free of the shared ReLU offset."""
    vector = np.asarray(mean_activation, dtype=np.float64).reshape(-1)
    if centred:
        vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < NORM_FLOOR:
        raise InvalidInputError(
            "the layer's mean activation on the triggers is constant: pick another layer "
            "or a trigger set the layer responds to"
        )
    return vector / norm
