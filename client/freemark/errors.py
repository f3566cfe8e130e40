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
    ├── EndpointError                         a prediction endpoint (OIP v2) was refused:
    │   ├── EndpointNotAllowedError              ENDPOINT_NOT_ALLOWED  (allow-list, DNS, redirect)
    │   ├── EndpointUnreachableError             ENDPOINT_UNREACHABLE  (DNS, connect, TLS)
    │   ├── EndpointTimeoutError                 ENDPOINT_DEADLINE     (connect, read, total)
    │   ├── EndpointResponseError                ENDPOINT_INVALID      (status, size, JSON, shape)
    │   │   └── EndpointInconsistentError          different answers to the same query
    │   └── EndpointBudgetError                  ENDPOINT_BUDGET       (queries per verdict, rate)
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
    │   ├── EndpointRefusedError              the key server refused the endpoint (the
    │   │   │                                  server-side twin of an EndpointError):
    │   │   ├── EndpointNotAllowedRefusal        ENDPOINT_NOT_ALLOWED
    │   │   ├── EndpointUnreachableRefusal       ENDPOINT_UNREACHABLE
    │   │   ├── EndpointDeadlineRefusal          ENDPOINT_DEADLINE
    │   │   ├── EndpointInvalidRefusal           ENDPOINT_INVALID
    │   │   └── EndpointBudgetRefusal            ENDPOINT_BUDGET
    │   ├── PanelTooWeakError                    PANEL_TOO_WEAK
    │   ├── UploadCorruptError                   UPLOAD_CORRUPT
    │   └── ServerInternalError                  INTERNAL
    ├── InvalidReceiptError                   a receipt or verdict file is malformed
    │   └── VerificationFailedError           a signature or inclusion proof failed
    ├── LogProofError                         a Merkle proof, checkpoint or audited log is bad
    └── CryptoError                           a decryption or signature check failed (opaque)

The endpoint errors are raised where the HTTP client runs (`freemark.endpoint`): in the owner's
own `extract --endpoint` and in the key server, which refuses a verify with the class's `REASON`
(a proto `ErrorReason` name), so one class decides the reason on both sides.

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
    "AlignmentLimitError",
    "AlphaOutsidePolicyError",
    "AlreadyRegisteredError",
    "CallDeadlineError",
    "CallEndedError",
    "CryptoError",
    "DeadlineExceededError",
    "DerivationError",
    "EndpointBudgetError",
    "EndpointError",
    "EndpointInconsistentError",
    "EndpointNotAllowedError",
    "EndpointResponseError",
    "EndpointTimeoutError",
    "EndpointUnreachableError",
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

    @classmethod
    def refused(cls, source: object, why: str) -> ModelFileError:
        """The one wording of a file a format's reader refuses: the file, then why (what a
        person can change in `why`)."""
        return cls(f"{source}: refused: {why}")


class AlignmentLimitError(FreemarkError):
    """A layer has more live units than the aligned test matches: aligning it would cost memory
    and time quadratic in its width. Not an InvalidInputError on purpose: nothing that skips
    an unreadable layer (a scan's candidates) may skip this one, or widening the key layer
    would hide it from the test."""


class UniquenessError(FreemarkError):
    """A derived key also decodes from an unrelated (null-panel) model, so it proves nothing."""


class DerivationError(FreemarkError):
    """Gradient descent did not push every bit past its margin."""


# --- querying a prediction endpoint (Open Inference Protocol v2) --------------------------


class EndpointError(FreemarkError):
    """A prediction endpoint was refused before anything it said could become evidence.

    `REASON` is the `ErrorReason` (proto/freemark/v1/errors.proto) the key server refuses a
    verify with when it meets this error, so the reason is decided once, here. The message
    names the endpoint and what to do; it never quotes more than a short, escaped excerpt of
    what the endpoint sent.
    """

    REASON: ClassVar[str] = ""


class EndpointNotAllowedError(EndpointError):
    """The URL's host, an address its name resolved to, or a redirect's target is outside the
    allow-list (a redirect is refused wherever it points: no request follows one)."""

    REASON = "ENDPOINT_NOT_ALLOWED"


class EndpointUnreachableError(EndpointError):
    """The name did not resolve, the connection was refused or reset, or TLS did not verify."""

    REASON = "ENDPOINT_UNREACHABLE"


class EndpointTimeoutError(EndpointError):
    """The endpoint did not connect, answer or finish inside the connect, read or total
    deadline of the policy."""

    REASON = "ENDPOINT_DEADLINE"


class EndpointResponseError(EndpointError):
    """The endpoint's answer cannot be judged: an HTTP error, a body over the cap, malformed
    JSON, metadata that does not fit the queries, or outputs of the wrong shape or datatype."""

    REASON = "ENDPOINT_INVALID"


class EndpointInconsistentError(EndpointResponseError):
    """The endpoint answered repeats of the same queries differently, more often than the
    policy tolerates: its answers are not a function of the inputs, so they prove nothing."""


class EndpointBudgetError(EndpointError):
    """The queries would exceed the budget of one verdict, or the endpoint's rate limit is
    spent; `retry_after` (seconds) is set when waiting helps, None when it never will."""

    REASON = "ENDPOINT_BUDGET"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


class EndpointRefusedError(ServerError):
    """The key server refused a prediction endpoint: it met the `EndpointError` whose `REASON`
    this refusal carries (the endpoint's own class decides the reason, on both sides)."""


class EndpointNotAllowedRefusal(EndpointRefusedError):
    """The endpoint is outside the key server's allow-list, or it redirected."""

    REASON = EndpointNotAllowedError.REASON


class EndpointUnreachableRefusal(EndpointRefusedError):
    """The key server could not reach the endpoint (DNS, connect, TLS)."""

    REASON = EndpointUnreachableError.REASON


class EndpointDeadlineRefusal(EndpointRefusedError):
    """The endpoint did not answer inside the key server's deadlines."""

    REASON = EndpointTimeoutError.REASON


class EndpointInvalidRefusal(EndpointRefusedError):
    """The endpoint's answers could not be judged (status, size, JSON, shape, consistency)."""

    REASON = EndpointResponseError.REASON


class EndpointBudgetRefusal(EndpointRefusedError):
    """The verification would exceed the key server's query budget or the endpoint's rate."""

    REASON = EndpointBudgetError.REASON
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
                EndpointNotAllowedRefusal, EndpointUnreachableRefusal, EndpointDeadlineRefusal,
                EndpointInvalidRefusal, EndpointBudgetRefusal, PanelTooWeakError)
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
