"""The client's error tree: catch `FreemarkError` to handle anything this library raises.

One base class lets the CLI print one readable line for any failure, while callers that care
can tell a bad input from a refused key or a server-side failure. Refusals keep their reason
end to end: the server sets a `google.rpc.ErrorInfo` reason declared in
`proto/freemark/v1/errors.proto` (`ErrorReason`), and `freemark.rpc` converts every
`grpc.RpcError` once, at the transport, into the class of that reason (`error_for`). Nothing
of grpc's own exception types leaks past the client. The tree::

    FreemarkError
    ├── InvalidInputError (also ValueError)   a local argument or file is malformed
    │   └── ModelFileError                    a model file is unreadable or unsafe
    ├── UniquenessError                       a locally derived key also decodes elsewhere
    ├── DerivationError                       gradient descent did not clear every margin
    ├── TransportError                        the key server could not be reached
    ├── ServerError                           the key server refused or failed the call
    │   ├── InvalidArgumentError              the request was refused as invalid:
    │   │   ├── MalformedRequestError            MALFORMED_REQUEST
    │   │   ├── InvalidBundleError               INVALID_BUNDLE
    │   │   ├── InvalidModelError                INVALID_MODEL
    │   │   ├── HostMismatchError                HOST_MISMATCH
    │   │   ├── NotUniqueError                   NOT_UNIQUE
    │   │   └── SandboxCrashedError              SANDBOX_CRASHED
    │   ├── UnauthenticatedError                 UNAUTHENTICATED
    │   ├── PermissionDeniedError                PERMISSION_DENIED
    │   ├── NotFoundError                        NOT_FOUND
    │   ├── AlreadyRegisteredError               ALREADY_CLAIMED
    │   ├── ResourceExhaustedError            over a cap, or the server is at capacity:
    │   │   ├── TooLargeError                    TOO_LARGE
    │   │   ├── SandboxLimitError                SANDBOX_LIMIT
    │   │   ├── RateLimitedError                 RATE_LIMITED
    │   │   ├── SpoolFullError                   SPOOL_FULL
    │   │   └── SandboxBusyError                 SANDBOX_BUSY (retry later)
    │   ├── DeadlineExceededError             out of time (also the client's own deadline):
    │   │   ├── SandboxTimeoutError              SANDBOX_DEADLINE
    │   │   ├── UploadStalledError               UPLOAD_STALLED
    │   │   └── CallDeadlineError                CALL_DEADLINE
    │   ├── CallEndedError                       CALL_ENDED
    │   ├── RevokedError                         REVOKED
    │   ├── PanelTooWeakError                    PANEL_TOO_WEAK
    │   ├── UploadCorruptError                   UPLOAD_CORRUPT
    │   └── ServerInternalError                  INTERNAL
    ├── InvalidReceiptError                   a receipt or verdict file is malformed
    │   └── VerificationFailedError           a signature or inclusion proof failed
    ├── LogProofError                         a Merkle proof, checkpoint or audited log is bad
    └── CryptoError                           a decryption or signature check failed (opaque)

The three grouping classes (`InvalidArgumentError`, `ResourceExhaustedError`,
`DeadlineExceededError`) gather reasons that call for the same action; they are also what a
call raises when the server sent no reason (a proxy, an older server) or one this client does
not know, chosen by status. Any other status without a known reason is a plain `ServerError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from freemark.v1 import errors_pb2

if TYPE_CHECKING:  # only for annotations: the scheme modules import this without grpc
    import grpc

__all__ = [
    "ERROR_DOMAIN",
    "AlphaOutsidePolicyError",
    "AlreadyRegisteredError",
    "CallDeadlineError",
    "CallEndedError",
    "CryptoError",
    "DeadlineExceededError",
    "DerivationError",
    "FreemarkError",
    "HostMismatchError",
    "InvalidArgumentError",
    "InvalidBundleError",
    "InvalidInputError",
    "InvalidModelError",
    "InvalidReceiptError",
    "LogProofError",
    "MalformedRequestError",
    "ModelFileError",
    "NotFoundError",
    "NotUniqueError",
    "PanelTooWeakError",
    "PermissionDeniedError",
    "RateLimitedError",
    "ResourceExhaustedError",
    "RevokedError",
    "SandboxBusyError",
    "SandboxCrashedError",
    "SandboxLimitError",
    "SandboxTimeoutError",
    "ServerError",
    "ServerInternalError",
    "SpoolFullError",
    "TooLargeError",
    "TransportError",
    "UnauthenticatedError",
    "UniquenessError",
    "UploadCorruptError",
    "UploadStalledError",
    "VerificationFailedError",
    "error_for",
]

# google.rpc.ErrorInfo.domain of our reasons: the proto package that declares them.
ERROR_DOMAIN: str = errors_pb2.DESCRIPTOR.package


class FreemarkError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(FreemarkError, ValueError):
    """An argument or file is malformed: wrong layer, bad shape, out-of-range N, ..."""


class ModelFileError(InvalidInputError):
    """A model file is unreadable, not a model, or needs unsafe loading (pickle, compiled code)."""


class UniquenessError(FreemarkError):
    """A derived key also decodes from an unrelated (null-panel) model, so it proves nothing."""


class DerivationError(FreemarkError):
    """Gradient descent did not push every bit past its margin."""


# --- talking to the key server --------------------------------------------------------------


class TransportError(FreemarkError):
    """The key server could not be reached: refused, TLS failure, or still UNAVAILABLE after
    every retry. Worth retrying later; nothing was decided by the server."""


class ServerError(FreemarkError):
    """The key server answered a call with an error status.

    `code` is the `grpc.StatusCode`, `reason` the `ErrorReason` name the server gave (None when
    it gave none) and `message` the server's actionable text, so callers can branch without
    parsing strings. Subclasses name what happened; `REASON` is the reason each one stands for.
    """

    REASON: ClassVar[str | None] = None

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(f"{reason}: {message}" if reason else f"{message} [{code.name}]")
        self.code = code
        self.message = message
        self.reason = reason


class InvalidArgumentError(ServerError):
    """INVALID_ARGUMENT: the request, bundle or model was refused; the subclass says which."""


class MalformedRequestError(InvalidArgumentError):
    """The request itself is wrong: missing header, empty id, out-of-range size or index."""

    REASON = "MALFORMED_REQUEST"


class InvalidBundleError(InvalidArgumentError):
    """The key bundle does not parse or is inconsistent."""

    REASON = "INVALID_BUNDLE"


class InvalidModelError(InvalidArgumentError):
    """The uploaded model is unreadable, unsafe or lacks the key's layer."""

    REASON = "INVALID_MODEL"


class HostMismatchError(InvalidArgumentError):
    """The key does not fit the uploaded host (fingerprint differs or not every bit decodes)."""

    REASON = "HOST_MISMATCH"


class NotUniqueError(InvalidArgumentError):
    """The server found that the key also decodes from an unrelated model; derive it again."""

    REASON = "NOT_UNIQUE"


class AlphaOutsidePolicyError(InvalidArgumentError):
    """The alpha asked for is outside the range the server signs verdicts for (named)."""

    REASON = "ALPHA_OUTSIDE_POLICY"


class UnauthenticatedError(ServerError):
    """No token, one the server does not know, or a disabled principal."""

    REASON = "UNAUTHENTICATED"


class PermissionDeniedError(ServerError):
    """The caller's role or ownership does not allow the call."""

    REASON = "PERMISSION_DENIED"


class NotFoundError(ServerError):
    """No such registration visible to the caller."""

    REASON = "NOT_FOUND"


class AlreadyRegisteredError(ServerError):
    """An earlier registration already claims this model (the message names it)."""

    REASON = "ALREADY_CLAIMED"


class ResourceExhaustedError(ServerError):
    """RESOURCE_EXHAUSTED: over one of the server's caps, or the server is at capacity."""


class TooLargeError(ResourceExhaustedError):
    """The upload or key bundle is over the server's cap (named in the message)."""

    REASON = "TOO_LARGE"


class SandboxLimitError(ResourceExhaustedError):
    """The model exceeded the sandbox's memory, CPU-time or output limits."""

    REASON = "SANDBOX_LIMIT"


class RateLimitedError(ResourceExhaustedError):
    """Too many calls at once, or a Register or Verify rate limit is spent; retry after the
    named wait."""

    REASON = "RATE_LIMITED"


class SpoolFullError(ResourceExhaustedError):
    """The server's upload spool is full (all of it, or your share of it); the partial upload
    was deleted. Retry later."""

    REASON = "SPOOL_FULL"


class SandboxBusyError(ResourceExhaustedError):
    """Every sandbox worker is busy and the queue is full; nothing ran. Retry after a while
    (the server's google.rpc.RetryInfo says how long)."""

    REASON = "SANDBOX_BUSY"


class SandboxCrashedError(InvalidArgumentError):
    """The model crashed the sandbox process (a memory-unsafe operator, say); it is refused."""

    REASON = "SANDBOX_CRASHED"


class CallEndedError(ServerError):
    """The call was cancelled while its model ran; nothing was signed."""

    REASON = "CALL_ENDED"


class DeadlineExceededError(ServerError):
    """DEADLINE_EXCEEDED: the call ran past its deadline (the client's own, without a reason)."""


class SandboxTimeoutError(DeadlineExceededError):
    """The model did not finish inside the sandbox's deadline."""

    REASON = "SANDBOX_DEADLINE"


class UploadStalledError(DeadlineExceededError):
    """The upload was idle past the server's timeout, slower than its minimum rate, or longer
    than its maximum stream duration."""

    REASON = "UPLOAD_STALLED"


class CallDeadlineError(DeadlineExceededError):
    """The call's deadline passed while its model waited for or ran in the sandbox; the run
    was killed and nothing was signed. Retry with a longer deadline."""

    REASON = "CALL_DEADLINE"


class RevokedError(ServerError):
    """The registration was revoked; it stays in the log, and verifies are refused."""

    REASON = "REVOKED"


class PanelTooWeakError(ServerError):
    """Register: the reference panel cannot give a relabelled copy of the host a match at the
    policy's alpha; add independent references, or ask the operator to review the members
    the message names. Nothing was registered."""

    REASON = "PANEL_TOO_WEAK"


class UploadCorruptError(ServerError):
    """The bytes the server received do not match the upload header; worth re-sending."""

    REASON = "UPLOAD_CORRUPT"


class ServerInternalError(ServerError):
    """Something unexpected failed on the server; the message has the operator's reference."""

    REASON = "INTERNAL"


_BY_REASON: dict[str, type[ServerError]] = {
    cls.REASON: cls
    for cls in (MalformedRequestError, InvalidBundleError, InvalidModelError, HostMismatchError,
                NotUniqueError, UnauthenticatedError, PermissionDeniedError, NotFoundError,
                AlreadyRegisteredError, TooLargeError, SandboxLimitError, SandboxTimeoutError,
                RevokedError, UploadCorruptError, ServerInternalError, AlphaOutsidePolicyError,
                RateLimitedError, SpoolFullError, UploadStalledError,
                SandboxBusyError, SandboxCrashedError, CallEndedError, CallDeadlineError,
                PanelTooWeakError)
    if cls.REASON is not None
}

# Without a (known) reason, by status name: the statuses that mean the same whoever sent them
# (a proxy, an older server). FAILED_PRECONDITION, DATA_LOSS, INTERNAL and the rest stay plain.
_BY_STATUS: dict[str, type[ServerError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyRegisteredError,
}


def error_for(code: grpc.StatusCode, message: str, reason: str | None = None) -> ServerError:
    """The `ServerError` for a refusal: by `reason` (an `ErrorReason` name) when this client
    knows it, else by status; an unknown reason is kept on the error all the same."""
    cls = _BY_REASON.get(reason or "") or _BY_STATUS.get(code.name, ServerError)
    return cls(code, message, reason)


# --- offline verification -------------------------------------------------------------------


class InvalidReceiptError(FreemarkError):
    """A receipt or verdict is malformed or inconsistent: unreadable file, a body that is not
    canonical JSON, a typed field that disagrees with the signed body, the wrong kind."""


class VerificationFailedError(InvalidReceiptError):
    """A cryptographic check failed: the statement or checkpoint signature, the key id, or the
    inclusion proof. A subclass of `InvalidReceiptError` so one `except` refuses any bad file."""


class LogProofError(FreemarkError):
    """A proof, checkpoint or audited log does not check out; the message says where.

    Raised by `freemark.tlog.merkle` (and importable from there)."""


_OPAQUE_MESSAGE = "decryption or signature check failed"


class CryptoError(FreemarkError):
    """A decryption or signature check failed; deliberately silent about which one and why.

    Raised by `freemark.tlog.signatures` and the server's envelopes (and importable from there)."""

    def __init__(self) -> None:
        super().__init__(_OPAQUE_MESSAGE)
