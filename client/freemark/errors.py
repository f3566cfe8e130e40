"""The client's error tree: catch `FreemarkError` to handle anything this library raises.

One base class lets the CLI print one readable line for any failure, while callers
that care can tell a bad input from a refused key or a server-side failure. Server errors are
converted from `grpc.RpcError` once, in `freemark.rpc`, and keep the status code; nothing of
grpc's own exception types leaks past the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: the scheme modules import this without grpc
    import grpc


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

    `code` is the `grpc.StatusCode` and `message` the server's actionable text, so callers can
    branch on the code without parsing strings; subclasses name the statuses callers act on.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{message} [{code.name}]")
        self.code = code
        self.message = message


class InvalidArgumentError(ServerError):
    """INVALID_ARGUMENT: the bundle, model file or request was refused as malformed."""


class UnauthenticatedError(ServerError):
    """UNAUTHENTICATED: no token, or one the server does not know."""


class PermissionDeniedError(ServerError):
    """PERMISSION_DENIED: the caller's role or ownership does not allow the call."""


class NotFoundError(ServerError):
    """NOT_FOUND: no such registration visible to the caller."""


class AlreadyRegisteredError(ServerError):
    """ALREADY_EXISTS: an earlier registration already claims this model (the message names it)."""


class ResourceExhaustedError(ServerError):
    """RESOURCE_EXHAUSTED: the upload is over the server's cap, or the server is at capacity."""


class DeadlineExceededError(ServerError):
    """DEADLINE_EXCEEDED: the call, or the suspect model in the server's sandbox, ran too long."""


class RevokedError(ServerError):
    """FAILED_PRECONDITION: the registration was revoked."""


# --- offline verification -------------------------------------------------------------------


class InvalidReceiptError(FreemarkError):
    """A receipt or verdict is malformed or inconsistent: unreadable file, a body that is not
    canonical JSON, a typed field that disagrees with the signed body, the wrong kind."""


class VerificationFailedError(InvalidReceiptError):
    """A cryptographic check failed: the statement or checkpoint signature, the key id, or the
    inclusion proof. A subclass of `InvalidReceiptError` so one `except` refuses any bad file."""
