"""freemark: prove you own a neural network without changing one weight.

Quick start::

    import freemark
    triggers = freemark.select_triggers(x_train, y_train, per_class=10)
    bundle = freemark.derive_key(model, layer="act", triggers=triggers, owner="alice@example.com")
    freemark.save_bundle("model.fmk", bundle)          # secret: protect it like a private key
    verdict = freemark.extract(suspect_model, bundle)  # calibrated p-value and decision
    print(verdict.is_match, verdict.p_value)

The scheme (design §1) lives in small modules: watermark, triggers, activations, keygen,
derive, extract, verdict; bundle defines the key file; modelfile loads untrusted models safely.
"""

from freemark.bundle import KeyBundle, load_bundle, save_bundle
from freemark.derive import derive_key
from freemark.errors import (
    DerivationError, FreemarkError, InvalidInputError, ModelFileError, UniquenessError,
)
from freemark.extract import extract
from freemark.keygen import DerivationSettings
from freemark.modelfile import fingerprint, load_program, save_program
from freemark.triggers import TriggerSet, load_triggers, save_triggers, select_triggers
from freemark.verdict import Verdict

__all__ = [
    "DerivationError",
    "DerivationSettings",
    "FreemarkError",
    "InvalidInputError",
    "KeyBundle",
    "ModelFileError",
    "TriggerSet",
    "UniquenessError",
    "Verdict",
    "derive_key",
    "extract",
    "fingerprint",
    "load_bundle",
    "load_program",
    "load_triggers",
    "save_bundle",
    "save_program",
    "save_triggers",
    "select_triggers",
]
