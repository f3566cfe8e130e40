"""A tensor's prior-claim signature: its probes' similarity structure, unit order forgotten.

Read a tensor on P probe inputs: a (P, units) matrix X. Centre each unit's column and scale
it to unit norm (a unit rescaled across a ReLU, or scaled down whole, reads the same), drop
the units that are constant on the probes (zero or dead dummies) and all but one of the units
whose columns are equal (split units: a unit divided into proportional parts), then take the
probe-by-probe Gram matrix K = X Xᵀ: a sum over units, so relabelling the units changes
nothing. Its off-diagonal upper triangle, normalised, is the signature; the inner product of
two signatures is the linear CKA of the two tensors on the probes (Kornblith et al., ICML
2019), high for a model and its fine-tuned, pruned, quantised or relabelled copies.

It is a shortlist, not evidence: independently trained models of one architecture also
share much of their similarity structure, so the index only ranks, and the full check with
the earlier owner's secret key decides (`handlers.register`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from freemark.scheme.triggers import TriggerSet

__all__ = ["DIMENSIONS", "MIN_UNITS", "PROBES", "group_of", "input_kind", "kind_of_inputs",
           "probe_rows", "signature"]

# Probes per signature: 32 give 496 dimensions (1,984 bytes per registration in the index)
# and ranked every copy of docs/keyserver.md's labelled set first; more probes cost memory
# quadratically and did not change a ranking.
PROBES = 32
DIMENSIONS = PROBES * (PROBES - 1) // 2
# A tensor with fewer distinct live units than this says too little to rank by.
MIN_UNITS = 4
# Normalised profiles equal to this many decimals are one unit split into parts.
DUPLICATE_DECIMALS = 6
_UPPER = np.triu_indices(PROBES, 1)


def signature(activations: np.ndarray) -> np.ndarray | None:
    """The unit-norm float32 signature of a (PROBES, units) activation matrix; None when
    the tensor has too few live, distinct units on the probes to say anything.

    Its cost depends on the tensor's shape only, never on its values: every step runs on
    the whole matrix (dropped units are zeroed, not removed), so how long Register takes
    says nothing of what the upload computed on another owner's triggers (issue 18)."""
    x = np.asarray(activations, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != PROBES:
        return None
    finite = bool(np.all(np.isfinite(x)))
    x = np.nan_to_num(x - np.nan_to_num(x).mean(axis=0), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(x, axis=0)
    live = norms > 1e-9 * max(float(norms.max(initial=0.0)), 1e-300)
    x = x * np.where(live, 1.0 / np.where(live, norms, 1.0), 0.0)
    # Split units: equal normalised profiles, kept once (sorting, not a units x units
    # product: a language model's logits are a tensor the scan reads too).
    _, first = np.unique(np.round(x.T, DUPLICATE_DECIMALS), axis=0, return_index=True)
    distinct = np.zeros(x.shape[1], dtype=bool)
    distinct[first] = True
    live &= distinct
    x = x * live
    upper = (x @ x.T)[_UPPER]
    norm = float(np.linalg.norm(upper))
    if not finite or int(live.sum()) < MIN_UNITS or not norm > 0:
        return None
    return (upper / norm).astype(np.float32)


def probe_rows(activations: np.ndarray) -> np.ndarray:
    """The probe rows of a run on a group's anchor triggers followed by PROBES probes (all of
    a `probes_only` run's rows, as Register asks for them)."""
    return np.asarray(activations)[-PROBES:]


def input_kind(triggers: TriggerSet) -> tuple[int, bool, bool]:
    """What an upload must take to be read on these triggers: inputs of this rank, float or
    integer, with or without an attention mask. Sizes are left to the sandbox child, which
    compares them with the upload's declared input shape (`freemark.scheme.activations.
    accepts`), so a model that takes any sequence length or image size is still compared."""
    return kind_of_inputs(triggers.inputs, masked=triggers.attention_mask is not None)


def kind_of_inputs(inputs: np.ndarray, *, masked: bool = False) -> tuple[int, bool, bool]:
    """`input_kind` of a batch of inputs (an output key's queries: never masked)."""
    inputs = np.asarray(inputs)
    return inputs.ndim, bool(np.issubdtype(inputs.dtype, np.floating)), masked


def group_of(triggers: TriggerSet) -> bytes:
    """The index group of a registration: its input kind and per-input shape. Signatures
    are compared within a group only, on the group's own probes."""
    rank, floating, mask = input_kind(triggers)
    shape = list(np.asarray(triggers.inputs).shape[1:])
    return json.dumps({"rank": rank, "float": floating, "mask": mask, "shape": shape},
                      sort_keys=True, separators=(",", ":")).encode()


def kind_of_group(group: bytes) -> tuple[int, bool, bool]:
    """The input kind a group key names (`group_of`)."""
    fields = json.loads(group)
    return int(fields["rank"]), bool(fields["float"]), bool(fields["mask"])


def group_digest(group: bytes) -> str:
    """A short name for a group in logs."""
    return hashlib.sha256(group).hexdigest()[:12]
