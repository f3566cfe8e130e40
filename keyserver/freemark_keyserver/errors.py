"""The server's error catalog: every refusal has a reason, a gRPC status and a public message.

Handlers raise `ServiceError(ErrorCode.X, "what to do about it")`; the servicer turns it into
the status with rich details (google.rpc.ErrorInfo, reason `code.reason` in `ERROR_DOMAIN`).
The reasons are declared once, in `proto/freemark/v1/errors.proto` (`ErrorReason`): each code
here names its proto value, so a code the proto lacks fails at import, and a test fails when
a proto value has no code, a name differs, or the status documented in the proto is not the
one used here. The detail text is written by us and never contains secrets; anything
unexpected becomes INTERNAL with an opaque reference.
"""

from __future__ import annotations

from enum import Enum

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from freemark.errors import ERROR_DOMAIN
from freemark.v1 import errors_pb2 as reasons

__all__ = ["ERROR_DOMAIN", "ErrorCode", "ServiceError", "abort"]

S = grpc.StatusCode


class ErrorCode(Enum):
    """Refusal reasons; the value is (proto ErrorReason, gRPC status, short public summary)."""

    MALFORMED_REQUEST = (reasons.MALFORMED_REQUEST, S.INVALID_ARGUMENT, "malformed request")
    INVALID_BUNDLE = (reasons.INVALID_BUNDLE, S.INVALID_ARGUMENT, "invalid key bundle")
    INVALID_MODEL = (reasons.INVALID_MODEL, S.INVALID_ARGUMENT, "invalid model file")
    HOST_MISMATCH = (reasons.HOST_MISMATCH, S.INVALID_ARGUMENT,
                     "the key does not fit the uploaded host")
    NOT_UNIQUE = (reasons.NOT_UNIQUE, S.INVALID_ARGUMENT, "the key is not specific to the host")
    UNAUTHENTICATED = (reasons.UNAUTHENTICATED, S.UNAUTHENTICATED, "authentication required")
    PERMISSION_DENIED = (reasons.PERMISSION_DENIED, S.PERMISSION_DENIED, "not allowed")
    NOT_FOUND = (reasons.NOT_FOUND, S.NOT_FOUND, "not found")
    ALREADY_CLAIMED = (reasons.ALREADY_CLAIMED, S.ALREADY_EXISTS, "model already registered")
    TOO_LARGE = (reasons.TOO_LARGE, S.RESOURCE_EXHAUSTED, "upload too large")
    SANDBOX_LIMIT = (reasons.SANDBOX_LIMIT, S.RESOURCE_EXHAUSTED,
                     "model exceeded the sandbox limits")
    SANDBOX_DEADLINE = (reasons.SANDBOX_DEADLINE, S.DEADLINE_EXCEEDED,
                        "model did not finish in time")
    REVOKED = (reasons.REVOKED, S.FAILED_PRECONDITION, "registration revoked")
    UPLOAD_CORRUPT = (reasons.UPLOAD_CORRUPT, S.DATA_LOSS, "upload does not match its header")
    INTERNAL = (reasons.INTERNAL, S.INTERNAL, "internal error")
    SANDBOX_BUSY = (reasons.SANDBOX_BUSY, S.RESOURCE_EXHAUSTED, "the sandbox is busy")
    SANDBOX_CRASHED = (reasons.SANDBOX_CRASHED, S.INVALID_ARGUMENT,
                       "the model crashed the sandbox")
    CALL_ENDED = (reasons.CALL_ENDED, S.CANCELLED, "the call ended")
    CALL_DEADLINE = (reasons.CALL_DEADLINE, S.DEADLINE_EXCEEDED, "the call's deadline passed")
    ALPHA_OUTSIDE_POLICY = (reasons.ALPHA_OUTSIDE_POLICY, S.INVALID_ARGUMENT,
                            "alpha outside the verdict policy")
    RATE_LIMITED = (reasons.RATE_LIMITED, S.RESOURCE_EXHAUSTED, "rate limited")
    SPOOL_FULL = (reasons.SPOOL_FULL, S.RESOURCE_EXHAUSTED, "the server's upload spool is full")
    UPLOAD_STALLED = (reasons.UPLOAD_STALLED, S.DEADLINE_EXCEEDED, "upload stalled")
    # A prediction endpoint refused (`freemark.errors.EndpointError.REASON` names the row).
    ENDPOINT_NOT_ALLOWED = (reasons.ENDPOINT_NOT_ALLOWED, S.PERMISSION_DENIED,
                            "endpoint not allowed")
    ENDPOINT_UNREACHABLE = (reasons.ENDPOINT_UNREACHABLE, S.FAILED_PRECONDITION,
                            "endpoint unreachable")
    ENDPOINT_DEADLINE = (reasons.ENDPOINT_DEADLINE, S.DEADLINE_EXCEEDED,
                         "endpoint did not answer in time")
    ENDPOINT_INVALID = (reasons.ENDPOINT_INVALID, S.FAILED_PRECONDITION,
                        "endpoint answers cannot be judged")
    ENDPOINT_BUDGET = (reasons.ENDPOINT_BUDGET, S.RESOURCE_EXHAUSTED, "endpoint query budget spent")
    PANEL_TOO_WEAK = (reasons.PANEL_TOO_WEAK, S.FAILED_PRECONDITION,
                      "the reference panel cannot reach alpha")

    @property
    def reason(self) -> str:
        """The google.rpc.ErrorInfo reason: the proto `ErrorReason` value's name."""
        return reasons.ErrorReason.Name(self.value[0])

    @property
    def status(self) -> grpc.StatusCode:
        return self.value[1]

    @property
    def summary(self) -> str:
        return self.value[2]


class ServiceError(Exception):
    """A refusal with a public, actionable message.

    `retry_after` (seconds) is for refusals that go away by waiting (rate limits, a full
    spool): the servicer sends it as a google.rpc.RetryInfo detail.
    """

    def __init__(self, code: ErrorCode, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code.summary}: {detail}")
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


def abort(context: grpc.ServicerContext, code: ErrorCode, message: str,
          retry_after: float | None = None) -> None:
    """End the call with `code`'s status, an ErrorInfo naming its proto reason and, for a
    refusal that waiting cures, a RetryInfo with the wait.

    Trailing metadata already set on the call (the request id) is kept beside the status.
    """
    details = []
    infos: list[error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo] = [
        error_details_pb2.ErrorInfo(reason=code.reason, domain=ERROR_DOMAIN)]
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(max(1, round(retry_after * 1000)))
        infos.append(retry)
    for info in infos:
        detail = any_pb2.Any()
        detail.Pack(info)
        details.append(detail)
    status = rpc_status.to_status(status_pb2.Status(code=code.status.value[0], message=message,
                                                    details=details))
    context.set_trailing_metadata(tuple(context.trailing_metadata() or ())
                                  + tuple(status.trailing_metadata))
    context.abort(status.code, status.details)
