"""What a verdict reads from a model: its key layer on the triggers, and on the alignment
probes only where a test uses them.

The plain test reads the key layer on the triggers. The aligned test also needs the layer on
the key's alignment probes (1,024 by default, derived from the triggers), but it runs only
when the key has a probe profile and the panel has at least `MIN_PANEL` members (`aligns`).
Reading the probes otherwise costs a forward pass over 1,024 inputs for nothing: on
EfficientNet-Lite0 (224 × 224 inputs) 46 s against 2 s for the triggers alone. The one rule
lives here and both sides follow it: the owner's in-process `freemark.extract`, and the key
server, whose sandbox child builds the probes itself from the triggers (`probe_count`).
A reference panel member is always read on both: its probe reading is what calibrates the
aligned test.
"""

from __future__ import annotations

from collections.abc import Sized

import numpy as np
import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.scheme.activations import capture
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.probes import with_probes
from freemark.scheme.triggers import TriggerSet
from freemark.verdict.aligned import MIN_PANEL

__all__ = ["aligns", "inputs", "probe_count", "read_layer", "split_activations"]

Model = nn.Module | torch.export.ExportedProgram


def aligns(bundle: KeyBundle, panel: Sized) -> bool:
    """Whether a verdict with this key and panel runs the aligned test, i.e. whether reading
    the suspect on the alignment probes is of any use: the key has a probe profile and the
    panel has at least `MIN_PANEL` members. Otherwise the plain test alone decides."""
    return bundle.probe_profile is not None and len(panel) >= MIN_PANEL


def probe_count(bundle: KeyBundle, *, probes: bool) -> int:
    """How many alignment probes a reading includes: the key's, or none."""
    return bundle.probes if probes else 0


def inputs(bundle: KeyBundle, *, probes: bool) -> TriggerSet:
    """The inputs of one reading: the triggers, followed by the key's alignment probes when
    `probes` (one forward pass reads both)."""
    return with_probes(bundle.triggers, probe_count(bundle, probes=probes))


def split_activations(activations: np.ndarray, bundle: KeyBundle, probes: int
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """(trigger activations, probe activations or None) from a pass over the triggers and
    `probes` probes."""
    count = len(bundle.triggers)
    if probes == 0:
        return activations, None
    if len(activations) != count + probes:
        raise InvalidInputError(f"expected activations for {count} triggers and {probes} "
                                f"probes, got {len(activations)}")
    return activations[:count], activations[count:]


def read_layer(model: Model, bundle: KeyBundle, *, probes: bool
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """A model's key-layer activations on the triggers and, with `probes`, on the alignment
    probes (None without them, or when the key has none)."""
    activations, _ = capture(model, bundle.layer, inputs(bundle, probes=probes),
                             pooling=bundle.pooling)
    return split_activations(activations, bundle, probe_count(bundle, probes=probes))
