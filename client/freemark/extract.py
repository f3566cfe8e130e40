"""Extraction: read a suspect's activations with a key bundle and judge them.

Two tests (docs/design.md §1.1 and `docs/scheme.md`): the plain test reads the key on the suspect's
units as they are; the aligned test, run when a reference panel of at least
`aligned.MIN_PANEL` independent models is given and the key has a probe profile, first
matches the suspect's units to the host's (`freemark.verdict.canon`), so a relabelled, rescaled or
padded copy is still recognised. The verdict combines them (`verdict.decide`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.formats.onnx import OnnxModel
from freemark.panel import Reference, count_for, measure_reference
from freemark.reading import aligns, inputs, probe_count, read_layer, split_activations
from freemark.records.types import Verdict, VerdictTest
from freemark.scheme.bundle import KeyBundle
from freemark.verdict.aligned import MIN_PANEL, aligned_test
from freemark.verdict.canon import aligned_readout
from freemark.verdict.decision import (
    DEFAULT_ALPHA,
    DEFAULT_PERMUTATIONS,
    Test,
    count_matches,
    decide,
    judge,
    suspect_vector,
)

Model = nn.Module | torch.export.ExportedProgram


def suspect_activations(model: Model, bundle: KeyBundle) -> np.ndarray:
    """The suspect's pooled activations on the bundle's triggers, shape-checked against the key."""
    activations, _ = read_layer(model, bundle, probes=False)
    check_activations(activations, bundle)
    return activations


def check_activations(activations: np.ndarray, bundle: KeyBundle, *, any_width: bool = False) -> None:
    """Raise unless the activations are (n_triggers, units) and finite.

    `any_width` admits a layer of another width (a copy padded with dummy units, or
    pruned): only the aligned test can read it.
    """
    if activations.ndim != 2 or len(activations) != len(bundle.triggers) or (
            not any_width and activations.shape[1] != bundle.units):
        raise InvalidInputError(
            f"layer {bundle.layer!r} gives activations of shape {activations.shape}, the key "
            f"needs {(len(bundle.triggers), bundle.units)}: the suspect's layer has a different "
            f"width (a padded or pruned copy can be judged only with a reference panel)"
        )
    if not np.all(np.isfinite(activations)):
        raise InvalidInputError(f"layer {bundle.layer!r} produced non-finite activations")


def _plain_on_other_width(activations: np.ndarray, probes: np.ndarray, bundle: KeyBundle,
                          alpha: float) -> Verdict:
    """The plain test cannot read a layer of another width: p = 1, BER read after alignment."""
    assert bundle.probe_profile is not None
    readout = aligned_readout(bundle.probe_profile, probes, activations)
    z = suspect_vector(readout, centred=bundle.centred)
    matches = int(count_matches(bundle.key.astype(np.float64), z, bundle.bits))
    method = (f"not applicable: the suspect's layer has {activations.shape[1]} units, the key "
              f"reads {bundle.units}; matches and BER are read after alignment, for information")
    plain = VerdictTest(name="plain", statistic=float(matches), n=bundle.n_bits, p_value=1.0,
                        log10_p_value=0.0, method=method)
    return Verdict(n_bits=bundle.n_bits, matches=matches, ber=1.0 - matches / bundle.n_bits,
                   p_value=1.0, log10_p_value=0.0, p_value_method=method, p_value_binomial=1.0,
                   log10_p_value_binomial=0.0, alpha=alpha, is_match=False, tests=(plain,))


def judge_activations(activations: np.ndarray, bundle: KeyBundle, *, alpha: float = DEFAULT_ALPHA,
                      probe_activations: np.ndarray | None = None,
                      panel: Sequence[Reference] = (),
                      n_permutations: int = DEFAULT_PERMUTATIONS,
                      extra: Sequence[Test] = (), extra_panel: Sequence[bytes] = ()) -> Verdict:
    """The verdict from already-captured activations (what the TTP does after its sandbox).

    `panel` members also join the plain test's null (those of the host's width). `extra`
    are further tests of the same suspect by another key of the registration (an output
    key's, `freemark.blackbox.judge.output_tests`), whose nulls came from `extra_panel`:
    they join the verdict after the aligned test, under the one Bonferroni correction of
    `decide`.
    """
    can_align = aligns(bundle, panel) and probe_activations is not None
    check_activations(activations, bundle, any_width=can_align)
    if activations.shape[1] == bundle.units:
        z = suspect_vector(activations, centred=bundle.centred)
        refs = [suspect_vector(r.trigger_activations, centred=bundle.centred) for r in panel
                if r.trigger_activations.shape == activations.shape]
        plain = judge(bundle.key.astype(np.float64), bundle.bits, z, alpha=alpha, references=refs,
                      n_permutations=n_permutations)
    else:
        assert probe_activations is not None
        plain = _plain_on_other_width(activations, probe_activations, bundle, alpha)
    fingerprints = [r.fingerprint for r in panel]
    fingerprints += [f for f in extra_panel if f not in fingerprints]
    if not can_align:
        return decide(plain, list(extra), fingerprints, alpha=alpha, untested=_why_untested(
            bundle, probe_activations, panel))
    assert bundle.probe_profile is not None and probe_activations is not None
    aligned = aligned_test(bundle.probe_profile, probe_activations,
                           [count_for(r, bundle) for r in panel])
    return decide(plain, [aligned, *extra], fingerprints, alpha=alpha)


def panel_reach(bundle: KeyBundle, host_triggers: np.ndarray, host_probes: np.ndarray | None,
                panel: Sequence[Reference], *, alpha: float) -> Verdict:
    """The verdict `panel` gives a copy of the host: can a copy be a `match` at `alpha` at all?

    Where the aligned test runs, the copy is the host relabelled (its units in reverse order,
    so the plain test reads noise and the aligned test decides at its best): a thief's free
    rewrite, and what the panel is for. Otherwise the copy is the host as it is: no panel
    makes the plain test see through relabelling, but a panel member may still bound it. A
    panel whose verdict on this copy is not a match leaves every verdict of the registration
    on such a copy `inconclusive` at best; the key server checks it before sealing a panel.
    """
    if aligns(bundle, panel) and host_probes is not None:
        order = np.arange(host_triggers.shape[1])[::-1]
        return judge_activations(host_triggers[:, order], bundle, alpha=alpha,
                                 probe_activations=host_probes[:, order], panel=panel)
    return judge_activations(host_triggers, bundle, alpha=alpha, panel=panel)


def _why_untested(bundle: KeyBundle, probes: np.ndarray | None, panel: Sequence[Reference]) -> str:
    if bundle.probe_profile is None:
        return "the key has no probe profile: re-derive it with this version of freemark"
    if not panel:
        return "no reference panel"
    if len(panel) < MIN_PANEL:
        return f"a panel of {len(panel)}; the aligned test needs at least {MIN_PANEL}"
    return "the suspect was not read on the probes"


def extract(model: Model, bundle: KeyBundle, *, alpha: float = DEFAULT_ALPHA,
            references: Sequence[Model] = (),
            n_permutations: int = DEFAULT_PERMUTATIONS) -> Verdict:
    """Extract the watermark from `model` with `bundle` and judge it.

    `references` are independent models of the host's architecture (never derived from
    it): with at least `MIN_PANEL` of them the aligned test also runs, so relabelling,
    rescaling or dummy units do not hide a copy. They are run in this process: pass only
    models you trust (the key server runs untrusted ones in its sandbox).
    """
    panel = [measure_reference(r, bundle) for r in references]
    triggers, probes = read_layer(model, bundle, probes=aligns(bundle, panel))
    return judge_activations(triggers, bundle, alpha=alpha, probe_activations=probes, panel=panel,
                             n_permutations=n_permutations)


def extract_onnx(model: OnnxModel, bundle: KeyBundle, *, alpha: float = DEFAULT_ALPHA,
                 references: Sequence[Model] = (),
                 n_permutations: int = DEFAULT_PERMUTATIONS) -> Verdict:
    """`extract` for an ONNX suspect, read by onnxruntime at its key tensor."""
    panel = [measure_reference(r, bundle) for r in references]
    probes = aligns(bundle, panel)
    seen = inputs(bundle, probes=probes)
    activations = model.capture(seen.inputs, seen.attention_mask, bundle.pooling)
    triggers, probed = split_activations(activations, bundle, probe_count(bundle, probes=probes))
    return judge_activations(triggers, bundle, alpha=alpha, probe_activations=probed, panel=panel,
                             n_permutations=n_permutations)
