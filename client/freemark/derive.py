"""The owner's flow: derive a key bundle for a model, and check it is unique before handing it out."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from freemark.errors import InvalidInputError, UniquenessError
from freemark.formats.pt2 import fingerprint
from freemark.scheme.activations import capture
from freemark.scheme.bundle import KeyBundle, MarginReport
from freemark.scheme.keygen import DerivationSettings, anchor, closed_form_key, descend, margins
from freemark.scheme.probes import DEFAULT_PROBES, MAX_PROBES, MIN_PROBES, make_probes
from freemark.scheme.triggers import TriggerSet
from freemark.scheme.watermark import check_n_bits, new_nonce, watermark_bits
from freemark.verdict.decision import (
    UNIQUENESS_ALPHA,
    judge,
    log10_binomial_sf,
    permutation_null,
    suspect_vector,
)

Model = nn.Module | torch.export.ExportedProgram
DEFAULT_BITS = 256
DEFAULT_SETTINGS = DerivationSettings()


def derive_key(
    model: Model,
    *,
    layer: str,
    triggers: TriggerSet,
    owner: str,
    n_bits: int = DEFAULT_BITS,
    settings: DerivationSettings = DEFAULT_SETTINGS,
    references: Sequence[Model] = (),
    centred: bool = True,
    nonce: bytes | None = None,
    anchor_seed: bytes | None = None,
    probes: int = DEFAULT_PROBES,
    progress: bool = False,
) -> KeyBundle:
    """Derive a secret key for `model` at `layer`; the model's weights are never changed.

    With `references` (models the owner knows are unrelated) their activations also
    serve as negatives in the descent and as members of the uniqueness check.
    Raises UniquenessError when a null-panel member decodes the watermark. `nonce` and
    `anchor_seed` default to fresh OS randomness; fix them only for reproducible experiments.
    `probes` alignment probes are derived from the triggers and the host's activations on
    them kept in the bundle, for the aligned test (0: plain test only).
    """
    check_n_bits(n_bits)
    check_probe_count(probes)
    phases = tqdm(total=3 + len(references), desc="deriving key", unit="phase",
                  disable=not progress, leave=False)
    before = fingerprint(model)
    activations, pooling = capture(model, layer, triggers)
    z = suspect_vector(activations, centred=centred)
    phases.update(1)
    reference_z = []
    for reference in references:
        reference_z.append(suspect_vector(capture(reference, layer, triggers, pooling=pooling)[0],
                                          centred=centred))
        phases.update(1)
    nonce = nonce or new_nonce()
    seed = anchor_seed or secrets.token_bytes(32)
    bits = watermark_bits(owner, nonce, n_bits)
    a0 = anchor(seed, n_bits, len(z))
    key = closed_form_key(a0, z, bits, margin=settings.margin, lam=settings.lam)
    # A reference that decodes the plain key is a copy of the host, not a null: refuse it
    # before asking the descent to separate two models that cannot be separated.
    check_uniqueness(key, bits, z, reference_z)
    if reference_z:
        key = descend(a0, z[None, :], bits, settings=settings,
                      negatives=np.stack(reference_z), progress=progress)
        check_uniqueness(key, bits, z, reference_z)
    phases.update(1)
    profile = probe_profile(model, layer, triggers, pooling, probes)
    phases.update(1)
    phases.close()
    host_margins = margins(key, z, bits)
    if fingerprint(model) != before:  # cheap insurance: derivation must be read-only
        raise RuntimeError("model weights changed during derivation")
    return KeyBundle(
        layer=layer, pooling=pooling, triggers=triggers, owner=owner, nonce=nonce,
        n_bits=n_bits, key=key.astype(np.float32), anchor_seed=seed,
        margins=MarginReport(target=settings.margin, min=float(host_margins.min()),
                             median=float(np.median(host_margins)), mean=float(host_margins.mean())),
        host_fingerprint=before, centred=centred, probe_profile=profile,
    )


def check_probe_count(probes: int) -> None:
    """A key carries no probes or MIN_PROBES..MAX_PROBES of them (checked before any work)."""
    if probes != 0 and not MIN_PROBES <= probes <= MAX_PROBES:
        raise InvalidInputError(f"probe count must be in [{MIN_PROBES}, {MAX_PROBES}] (or 0 for "
                                f"a key without an aligned test), got {probes}")


def probe_profile(model: Model, layer: str, triggers: TriggerSet, pooling: int,
                  probes: int = DEFAULT_PROBES) -> np.ndarray | None:
    """The model's pooled activations of `layer` on the probes derived from `triggers`."""
    if probes == 0:
        return None
    return capture(model, layer, make_probes(triggers, probes), pooling=pooling)[0].astype(np.float32)


def check_uniqueness(key: np.ndarray, bits: np.ndarray, host_z: np.ndarray,
                     reference_z: Sequence[np.ndarray] = ()) -> None:
    """Refuse a key that a null-panel member decodes (docs/design.md §1.1, uniqueness).

    Two checks: (1) the typical (median) random relabelling of the host's own units must
    not decode the watermark, which catches keys that read a direction every model shares
    (uncentred activations: the universal false positive); (2) no reference model may be
    judged a match at p ≤ 1e-3 under the same calibrated test the TTP uses.
    """
    n_bits = len(bits)
    median = int(np.median(permutation_null(key, bits, host_z)))
    if log10_binomial_sf(median, n_bits) <= np.log10(UNIQUENESS_ALPHA):
        raise UniquenessError(
            f"refused: a random relabelling of the host's units already decodes the watermark "
            f"(median BER {1 - median / n_bits:.3f}); the key would match unrelated models. "
            f"Use centred activations or another layer."
        )
    for index, ref in enumerate(reference_z):
        verdict = judge(key, bits, ref, alpha=UNIQUENESS_ALPHA)
        if verdict.is_match:
            raise UniquenessError(
                f"refused: reference model #{index} decodes the watermark "
                f"(BER {verdict.ber:.3f}, calibrated p {verdict.p_value:.2e} ≤ {UNIQUENESS_ALPHA}); "
                f"the key is not specific to the host. Pick another layer or more bits."
            )
