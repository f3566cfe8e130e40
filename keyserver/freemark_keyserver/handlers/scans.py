"""Locating a key layer in an upload by what it computes, not by what it is called.

A sandbox scan (`TriggerRun` with no layer) reads every tensor an upload computes on a key's
triggers (and probes, where the aligned test runs), named as the file names them; each
tensor is judged with the key as if it were the key layer (`judge_tensor`). Two flows use
it, each as its question needs:

- Register's prior-claim check (`register._PriorClaims`): any tensor an earlier key matches
  is a claim on the upload.
- Verify on a suspect whose names its author chose (an ONNX graph): the verdict is the
  strongest candidate's, Bonferroni-corrected over all of them (`judge_scan`), and it says
  which tensor that was and among how many (`SuspectReading`), so neither the file's names
  nor the requester decide what a signed `no_match` rests on (issue 18, item 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from freemark.errors import InvalidInputError
from freemark.extract import judge_activations
from freemark.panel import Reference
from freemark.reading import aligns, probe_count, split_activations
from freemark.records.types import SuspectReading, Verdict
from freemark.scheme.bundle import KeyBundle
from freemark.verdict.decision import DEFAULT_ALPHA, strongest_of
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.sandbox.runner import RUN_FAILED, LayerScan, TriggerRun

__all__ = ["judge_scan", "judge_tensor", "scan_run"]


def scan_run(bundle: KeyBundle, panel: Sequence[Reference]) -> TriggerRun:
    """The scan of an upload on a key's triggers (and probes, where its panel lets the
    aligned test run): tensors of the key's width, or of any width for the aligned test
    (which reads a padded or pruned copy), each pooled by its rank."""
    aligned = aligns(bundle, panel)
    return TriggerRun(None, bundle.pooling, bundle.triggers, probe_count(bundle, probes=aligned),
                      width=0 if aligned else bundle.units)


def judge_tensor(layer: np.ndarray, bundle: KeyBundle, panel: Sequence[Reference], probes: int,
                 *, alpha: float = DEFAULT_ALPHA) -> Verdict:
    """A key's verdict on one scanned tensor. The tensor is first divided by its largest
    magnitude: both tests are blind to a global scale, and a copy whose key layer was scaled
    down across a ReLU would otherwise fall under the read-out's absolute floor. `layer` is
    the scan's float32 as it came; the division makes the one float64 copy. Raises
    InvalidInputError for a tensor the key cannot be read on (a constant one, too few live
    units to align)."""
    peak = float(np.max(np.abs(layer))) if layer.size else 0.0
    if not peak > 0.0:
        raise InvalidInputError("a constant tensor")
    triggers, probed = split_activations(np.divide(layer, peak, dtype=np.float64), bundle, probes)
    return judge_activations(triggers, bundle, alpha=alpha, probe_activations=probed,
                             panel=panel)


def judge_scan(scan: LayerScan, bundle: KeyBundle, panel: Sequence[Reference], *, alpha: float,
               requested: str, max_candidates: int) -> tuple[Verdict, SuspectReading]:
    """The verdict on a scanned suspect and what it read: every tensor of `scan` is a
    candidate and judged with the key; the verdict is the strongest, its p-value multiplied
    by the number of candidates (`strongest_of`), so reading many tensors cannot make an
    independent model a match and no tensor can be hidden from it by its name.

    `requested` (the tensor the requester named, or "") is one of the candidates whatever
    its width (the scan reads it too; one the key cannot be read on counts and is never
    chosen): an addition, never the only thing read. Which tensors are candidates,
    and how many, is decided by the graph's shapes alone (the sandbox scan keeps a tensor
    that is not finite as zeros), so the refusals below and the count in the verdict say
    nothing about the triggers. Refusals: INVALID_MODEL when the suspect computes no
    candidate, or the requested tensor cannot be pooled at all (not floating point, no batch
    axis); SANDBOX_LIMIT over the operator's `max_candidates`; the fixed run-failure refusal
    when no candidate could be judged (each was constant on the triggers)."""
    names = scan.names
    if not names:
        raise ServiceError(ErrorCode.INVALID_MODEL, "the suspect computes no tensor the key can "
                           f"be read on ({_candidates(bundle, panel)})")
    if len(names) > max_candidates:
        raise ServiceError(ErrorCode.SANDBOX_LIMIT,
                           f"the suspect computes {len(names)} tensors the key could be read "
                           f"on; this key server judges at most {max_candidates} "
                           "(--max-scan-candidates), and a verdict on fewer would not be one "
                           "on the whole file")
    if requested and requested not in names:
        raise ServiceError(ErrorCode.INVALID_MODEL,
                           f"tensor {requested!r} cannot be read: a verdict reads "
                           "floating-point tensors computed from the inputs, batch axis first")
    probes = probe_count(bundle, probes=aligns(bundle, panel))
    judged: list[tuple[str, Verdict]] = []
    for name, layer in zip(names, scan.layers(), strict=True):
        try:
            judged.append((name, judge_tensor(layer, bundle, panel, probes, alpha=alpha)))
        except InvalidInputError:  # not readable on these triggers: still counted below
            continue
    if not judged:
        raise ServiceError(ErrorCode.INVALID_MODEL, RUN_FAILED)
    chosen, verdict = strongest_of([v for _, v in judged], candidates=len(names), alpha=alpha)
    return verdict, SuspectReading(tensor=judged[chosen][0], located="scan",
                                   candidates=len(names), requested=requested)


def _candidates(bundle: KeyBundle, panel: Sequence[Reference]) -> str:
    """What a scan reads, in words, for a refusal."""
    width = "of any width" if aligns(bundle, panel) else f"of {bundle.units} units"
    return ("it reads floating-point tensors computed from the inputs, batch axis first, "
            f"pooled by their rank and {width}")
