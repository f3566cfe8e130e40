"""Extraction: read a suspect's activations with a key bundle and judge them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from freemark.activations import capture
from freemark.bundle import KeyBundle
from freemark.errors import InvalidInputError
from freemark.verdict import DEFAULT_ALPHA, DEFAULT_PERMUTATIONS, Verdict, judge, suspect_vector

Model = nn.Module | torch.export.ExportedProgram


def suspect_activations(model: Model, bundle: KeyBundle) -> np.ndarray:
    """The suspect's pooled activations on the bundle's triggers, shape-checked against the key."""
    activations, _ = capture(model, bundle.layer, bundle.triggers, pooling=bundle.pooling)
    check_activations(activations, bundle)
    return activations


def check_activations(activations: np.ndarray, bundle: KeyBundle) -> None:
    """Raise unless the activations are (n_triggers, units) and finite."""
    expected = (len(bundle.triggers), bundle.units)
    if activations.shape != expected:
        raise InvalidInputError(
            f"layer {bundle.layer!r} gives activations of shape {activations.shape}, the key "
            f"needs {expected}: the suspect's layer has a different width"
        )
    if not np.all(np.isfinite(activations)):
        raise InvalidInputError(f"layer {bundle.layer!r} produced non-finite activations")


def judge_activations(activations: np.ndarray, bundle: KeyBundle, *, alpha: float = DEFAULT_ALPHA,
                      references: Sequence[np.ndarray] = (),
                      n_permutations: int = DEFAULT_PERMUTATIONS) -> Verdict:
    """The verdict from already-captured activations (what the TTP does after its sandbox)."""
    check_activations(activations, bundle)
    z = suspect_vector(activations, centred=bundle.centred)
    refs = [suspect_vector(r, centred=bundle.centred) for r in references]
    return judge(bundle.key.astype(np.float64), bundle.bits, z, alpha=alpha,
                 references=refs, n_permutations=n_permutations)


def extract(model: Model, bundle: KeyBundle, *, alpha: float = DEFAULT_ALPHA,
            references: Sequence[Model] = (),
            n_permutations: int = DEFAULT_PERMUTATIONS) -> Verdict:
    """Extract the watermark from `model` with `bundle` and judge it against the calibrated null."""
    ref_acts = [suspect_activations(r, bundle) for r in references]
    return judge_activations(suspect_activations(model, bundle), bundle, alpha=alpha,
                             references=ref_acts, n_permutations=n_permutations)
