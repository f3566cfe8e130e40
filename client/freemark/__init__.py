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

The scheme (design §1) lives in small modules: watermark, triggers, activations, keygen,
derive, extract, verdict; bundle defines the key file; modelfile loads untrusted models safely.
The key server's client is rpc (transport) with records (typed results) and receipt
(offline verification, on signatures and merkle).
"""

from freemark.audit.receipt import load_statement, save_statement, verify_receipt
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
    VerdictPolicy,
)
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle, load_bundle, save_bundle
from freemark.scheme.keygen import DerivationSettings
from freemark.scheme.triggers import TriggerSet, load_triggers, save_triggers, select_triggers
from freemark.verdict.decision import Verdict

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
    "LogProofError",
    "MalformedRequestError",
    "ModelFileError",
    "NotFoundError",
    "NotUniqueError",
    "PermissionDeniedError",
    "Receipt",
    "RegistrationInfo",
    "ResourceExhaustedError",
    "RevokedError",
    "SandboxLimitError",
    "SandboxTimeoutError",
    "ServerError",
    "ServerInternalError",
    "SignedVerdict",
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
    "extract",
    "fingerprint",
    "load_bundle",
    "load_program",
    "load_statement",
    "load_triggers",
    "save_bundle",
    "save_program",
    "save_statement",
    "save_triggers",
    "select_triggers",
    "verify_receipt",
]
