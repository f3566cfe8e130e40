"""The server's error catalog: every refusal has a code, a gRPC status and a public message.

Handlers raise `ServiceError(ErrorCode.X, "what to do about it")`; the servicer turns it into
the status with rich details (google.rpc.ErrorInfo). The detail text is written by us and
never contains secrets; anything unexpected becomes INTERNAL with an opaque reference.
"""

from __future__ import annotations

from enum import Enum

import grpc


class ErrorCode(Enum):
    """Refusal reasons; the value is (gRPC status, short public summary)."""

    MALFORMED_REQUEST = (grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
    INVALID_BUNDLE = (grpc.StatusCode.INVALID_ARGUMENT, "invalid key bundle")
    INVALID_MODEL = (grpc.StatusCode.INVALID_ARGUMENT, "invalid model file")
    HOST_MISMATCH = (grpc.StatusCode.INVALID_ARGUMENT, "the key does not fit the uploaded host")
    NOT_UNIQUE = (grpc.StatusCode.INVALID_ARGUMENT, "the key is not specific to the host")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, "authentication required")
    PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "not allowed")
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "not found")
    ALREADY_CLAIMED = (grpc.StatusCode.ALREADY_EXISTS, "model already registered")
    TOO_LARGE = (grpc.StatusCode.RESOURCE_EXHAUSTED, "upload too large")
    SANDBOX_LIMIT = (grpc.StatusCode.RESOURCE_EXHAUSTED, "model exceeded the sandbox limits")
    SANDBOX_DEADLINE = (grpc.StatusCode.DEADLINE_EXCEEDED, "model did not finish in time")
    REVOKED = (grpc.StatusCode.FAILED_PRECONDITION, "registration revoked")
    UPLOAD_CORRUPT = (grpc.StatusCode.DATA_LOSS, "upload does not match its header")
    INTERNAL = (grpc.StatusCode.INTERNAL, "internal error")

    @property
    def status(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def summary(self) -> str:
        return self.value[1]


class ServiceError(Exception):
    """A refusal with a public, actionable message."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.summary}: {detail}")
        self.code = code
        self.detail = detail
