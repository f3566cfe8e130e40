"""Reference panels: independent models of the host's architecture that calibrate the tests.

A panel member is reduced to what the tests need, its key-layer activations on the
triggers (the plain test's null) and on the alignment probes (the aligned test's null),
plus the fingerprint of its weights, so a verdict can name exactly which models it was
calibrated on (`freemark.verdict.aligned.panel_digest`). The owner measures a panel locally for
`freemark extract --reference`; the key server measures the panel attached at
registration in its sandbox and keeps it sealed beside the bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.formats.pt2 import fingerprint
from freemark.reading import read_layer
from freemark.scheme.bundle import KeyBundle, tensor_from_proto, tensor_to_proto
from freemark.v1 import bundle_pb2
from freemark.verdict.aligned import matched_units
from freemark.verdict.canon import canonicalise
from freemark.verdict.decision import count_matches, suspect_vector
from freemark.verdict.vetting import Lean, leaning

Model = nn.Module | torch.export.ExportedProgram


@dataclass(frozen=True, eq=False)
class Reference:
    """One panel member's activations on the triggers and the probes."""

    fingerprint: bytes
    trigger_activations: np.ndarray  # (triggers, units)
    probe_activations: np.ndarray  # (probes, units')
    # Its aligned-test count against the host (`freemark.verdict.aligned.matched_units`), measured
    # once with the panel so a verdict aligns only the suspect; None in records sealed
    # before counts were kept (then measured at the verdict).
    matched_units: int | None = None


def count_for(reference: Reference, bundle: KeyBundle) -> int:
    """The member's aligned-test count against the bundle's host: kept, or measured now."""
    if reference.matched_units is not None:
        return reference.matched_units
    if bundle.probe_profile is None:
        raise InvalidInputError("the key has no probe profile to align panel members to")
    return matched_units(bundle.probe_profile, reference.probe_activations)


def measure_reference(model: Model, bundle: KeyBundle) -> Reference:
    """Measure one reference model for `bundle` (in process: only for models you trust)."""
    triggers, probes = read_layer(model, bundle, probes=True)
    if probes is None or bundle.probe_profile is None:
        # a key made before the aligned test: the plain test's null only
        return Reference(fingerprint=fingerprint(model), trigger_activations=triggers,
                         probe_activations=np.zeros((0, triggers.shape[1])))
    return Reference(fingerprint=fingerprint(model), trigger_activations=triggers,
                     probe_activations=probes,
                     matched_units=matched_units(bundle.probe_profile, probes))


def leaning_members(panel: Sequence[Reference], bundle: KeyBundle, *, alpha: float
                    ) -> list[Lean]:
    """The members that lean toward the bundle's host (`freemark.verdict.vetting`), one entry
    per member (the stronger statistic), in panel order.

    Both statistics a panel calibrates are checked: the watermark bits a member decodes (the
    plain test's null, so members of the host's width only) and, where the key has a probe
    profile, the host units it carries after alignment (the aligned test's null).
    """
    found: dict[int, Lean] = {}
    key = bundle.key.astype(np.float64)
    plain = [i for i, r in enumerate(panel) if r.trigger_activations.shape[1] == bundle.units]
    decoded = [int(count_matches(key, suspect_vector(panel[i].trigger_activations,
                                                     centred=bundle.centred), bundle.bits))
               for i in plain]
    leans = [dataclasses.replace(lean, member=plain[lean.member])
             for lean in leaning(decoded, bundle.n_bits, alpha=alpha, test="plain")]
    if bundle.probe_profile is not None and panel:
        units = canonicalise(bundle.probe_profile).units
        leans += leaning([count_for(r, bundle) for r in panel], units, alpha=alpha,
                         test="aligned")
    for lean in leans:
        if lean.member not in found or lean.log10_p_value < found[lean.member].log10_p_value:
            found[lean.member] = lean
    return [found[member] for member in sorted(found)]


def fingerprints(panel: Sequence[Reference]) -> list[bytes]:
    """The members' fingerprints, for the panel digest."""
    return [member.fingerprint for member in panel]


def reference_to_proto(reference: Reference) -> bundle_pb2.ReferenceModel:
    return bundle_pb2.ReferenceModel(
        fingerprint=reference.fingerprint,
        trigger_activations=tensor_to_proto(reference.trigger_activations.astype(np.float32)),
        probe_activations=tensor_to_proto(reference.probe_activations.astype(np.float32)),
        matched_units=reference.matched_units)


def reference_from_proto(message: bundle_pb2.ReferenceModel) -> Reference:
    triggers = tensor_from_proto(message.trigger_activations, "reference trigger activations")
    probes = tensor_from_proto(message.probe_activations, "reference probe activations")
    if triggers.ndim != 2 or probes.ndim != 2 or len(message.fingerprint) != 32:
        raise InvalidInputError("malformed reference model record")
    return Reference(fingerprint=bytes(message.fingerprint),
                     trigger_activations=triggers.astype(np.float64),
                     probe_activations=probes.astype(np.float64),
                     matched_units=(message.matched_units if message.HasField("matched_units")
                                    else None))
