"""freemark: prove you own a neural network without changing one weight.

Quick start::

    import freemark
    triggers = freemark.select_triggers(x_train, y_train, per_class=10)
    bundle = freemark.derive_key(model, layer="act", triggers=triggers, owner="alice@example.com")
    freemark.save_bundle("model.fmk", bundle)          # secret: protect it like a private key
    verdict = freemark.extract(suspect_model, bundle)  # calibrated p-value and decision
    print(verdict.is_match, verdict.p_value)

    with freemark.KeyServiceClient("ttp.example.com:443", token=token) as ttp:
        receipt = ttp.register(bundle, Path("model.pt2"))       # signed, logged priority
        signed = ttp.verify(receipt.registration_id, Path("suspect.pt2"))
    freemark.save_statement("receipt.json", receipt)
    freemark.verify_receipt(freemark.load_statement("receipt.json"), ttp_public_key_pem)

    # Output keys: evidence from a model's answers alone (docs/blackbox.md)
    out_key = freemark.derive_output_key(model, x_train, y_train, references, owner="alice")
    freemark.save_output_key("model.fmo", out_key, passphrase)   # encrypted, mode 0600
    verdict = freemark.extract_outputs(freemark.LocalResponder(suspect_model), out_key)

The floor plan (docs/design.md §2), lowest layer first: `errors` and the generated `v1`; `scheme` (the
key's parts: watermark, triggers, probes, activations, keygen, bundle) and `tlog` (signatures,
signed notes, Merkle); `formats` (one table of model formats, one module per format) and
`records` (the signed records and their one conversion); `verdict` (statistics and the
decision, no torch) and `audit` (offline receipt checks, the log monitor); `reading` and
`panel` (what a verdict reads from a model); `derive`, `extract` and `rpc` (the owner's flow,
in-process extraction, `KeyServiceClient`); `cli`. import-linter contracts in pyproject.toml
hold the layering.

This face is lazy: a name is imported from its module on first use, so `import freemark`
(or `import freemark.verdict.stats`) loads neither torch nor grpc until a name needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from freemark.audit.receipt import load_statement, save_statement, verify_receipt
    from freemark.blackbox.judge import extract_outputs
    from freemark.blackbox.key import OutputKey, load_output_key, save_output_key
    from freemark.blackbox.local import LocalResponder
    from freemark.blackbox.queries import derive_output_key
    from freemark.blackbox.responder import Responder
    from freemark.derive import derive_key
    from freemark.errors import (
        AlphaOutsidePolicyError,
        AlreadyRegisteredError,
        CryptoError,
        DeadlineExceededError,
        DerivationError,
        FreemarkError,
        HostMismatchError,
        InvalidArgumentError,
        InvalidBundleError,
        InvalidInputError,
        InvalidModelError,
        InvalidReceiptError,
        LogProofError,
        MalformedRequestError,
        ModelFileError,
        NotFoundError,
        NotUniqueError,
        PanelTooWeakError,
        PermissionDeniedError,
        ResourceExhaustedError,
        RevokedError,
        SandboxLimitError,
        SandboxTimeoutError,
        ServerError,
        ServerInternalError,
        TooLargeError,
        TransportError,
        UnauthenticatedError,
        UniquenessError,
        UploadCorruptError,
        VerificationFailedError,
    )
    from freemark.extract import extract
    from freemark.formats.pt2 import fingerprint, load_program, save_program
    from freemark.records.types import (
        CoarseVerdict,
        Receipt,
        RegistrationInfo,
        SignedVerdict,
        SuspectReading,
        VerdictPolicy,
    )
    from freemark.rpc import KeyServiceClient
    from freemark.scheme.bundle import KeyBundle, load_bundle, save_bundle
    from freemark.scheme.keygen import DerivationSettings
    from freemark.scheme.triggers import TriggerSet, load_triggers, save_triggers, select_triggers
    from freemark.verdict.decision import Verdict

# Each public name and the module it lives in.
_WHERE: dict[str, str] = {
    "save_output_key": "freemark.blackbox.key",
    "Responder": "freemark.blackbox.responder",
    "OutputKey": "freemark.blackbox.key",
    "LocalResponder": "freemark.blackbox.local",
    "load_output_key": "freemark.blackbox.key",
    "extract_outputs": "freemark.blackbox.judge",
    "derive_output_key": "freemark.blackbox.queries",
    "AlphaOutsidePolicyError": "freemark.errors",
    "AlreadyRegisteredError": "freemark.errors",
    "CoarseVerdict": "freemark.records.types",
    "CryptoError": "freemark.errors",
    "DeadlineExceededError": "freemark.errors",
    "DerivationError": "freemark.errors",
    "DerivationSettings": "freemark.scheme.keygen",
    "derive_key": "freemark.derive",
    "extract": "freemark.extract",
    "fingerprint": "freemark.formats.pt2",
    "FreemarkError": "freemark.errors",
    "HostMismatchError": "freemark.errors",
    "InvalidArgumentError": "freemark.errors",
    "InvalidBundleError": "freemark.errors",
    "InvalidInputError": "freemark.errors",
    "InvalidModelError": "freemark.errors",
    "InvalidReceiptError": "freemark.errors",
    "KeyBundle": "freemark.scheme.bundle",
    "KeyServiceClient": "freemark.rpc",
    "load_bundle": "freemark.scheme.bundle",
    "load_program": "freemark.formats.pt2",
    "load_statement": "freemark.audit.receipt",
    "load_triggers": "freemark.scheme.triggers",
    "LogProofError": "freemark.errors",
    "MalformedRequestError": "freemark.errors",
    "ModelFileError": "freemark.errors",
    "NotFoundError": "freemark.errors",
    "NotUniqueError": "freemark.errors",
    "PanelTooWeakError": "freemark.errors",
    "PermissionDeniedError": "freemark.errors",
    "Receipt": "freemark.records.types",
    "RegistrationInfo": "freemark.records.types",
    "ResourceExhaustedError": "freemark.errors",
    "RevokedError": "freemark.errors",
    "SandboxLimitError": "freemark.errors",
    "SandboxTimeoutError": "freemark.errors",
    "save_bundle": "freemark.scheme.bundle",
    "save_program": "freemark.formats.pt2",
    "save_statement": "freemark.audit.receipt",
    "save_triggers": "freemark.scheme.triggers",
    "select_triggers": "freemark.scheme.triggers",
    "ServerError": "freemark.errors",
    "ServerInternalError": "freemark.errors",
    "SignedVerdict": "freemark.records.types",
    "SuspectReading": "freemark.records.types",
    "TooLargeError": "freemark.errors",
    "TransportError": "freemark.errors",
    "TriggerSet": "freemark.scheme.triggers",
    "UnauthenticatedError": "freemark.errors",
    "UniquenessError": "freemark.errors",
    "UploadCorruptError": "freemark.errors",
    "Verdict": "freemark.verdict.decision",
    "VerdictPolicy": "freemark.records.types",
    "VerificationFailedError": "freemark.errors",
    "verify_receipt": "freemark.audit.receipt",
}

__all__ = [
    "AlphaOutsidePolicyError",
    "AlreadyRegisteredError",
    "CoarseVerdict",
    "CryptoError",
    "DeadlineExceededError",
    "DerivationError",
    "DerivationSettings",
    "FreemarkError",
    "HostMismatchError",
    "InvalidArgumentError",
    "InvalidBundleError",
    "InvalidInputError",
    "InvalidModelError",
    "InvalidReceiptError",
    "KeyBundle",
    "KeyServiceClient",
    "LocalResponder",
    "LogProofError",
    "MalformedRequestError",
    "ModelFileError",
    "NotFoundError",
    "NotUniqueError",
    "OutputKey",
    "PanelTooWeakError",
    "PermissionDeniedError",
    "Receipt",
    "RegistrationInfo",
    "ResourceExhaustedError",
    "Responder",
    "RevokedError",
    "SandboxLimitError",
    "SandboxTimeoutError",
    "ServerError",
    "ServerInternalError",
    "SignedVerdict",
    "SuspectReading",
    "TooLargeError",
    "TransportError",
    "TriggerSet",
    "UnauthenticatedError",
    "UniquenessError",
    "UploadCorruptError",
    "Verdict",
    "VerdictPolicy",
    "VerificationFailedError",
    "derive_key",
    "derive_output_key",
    "extract",
    "extract_outputs",
    "fingerprint",
    "load_bundle",
    "load_output_key",
    "load_program",
    "load_statement",
    "load_triggers",
    "save_bundle",
    "save_output_key",
    "save_program",
    "save_statement",
    "save_triggers",
    "select_triggers",
    "verify_receipt",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'freemark' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Face(types.ModuleType):
    """The package object. `freemark.extract` names both a public function and the module it
    lives in: when the import system binds a loaded submodule on the package, a public name
    keeps its function (as it did when this face imported everything eagerly); the module
    stays reachable as `sys.modules["freemark.extract"]` and by `from freemark.extract import`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
