"""Every refusal reason over the wire: the server's catalog in, the client's named error out.

A small real gRPC server on loopback answers GetPublicKey through the key server's own
servicer guard (`freemark_keyserver.rpc.service._guard`), raising the scripted catalog code, so
each reason travels the real path: ErrorInfo packed into the status, trailers over HTTP/2,
`rpc_status.from_call` in the client, the class of the reason. The real key server provokes
the reasons it can cheaply in tests/integration/test_error_reasons.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from freemark import errors
from freemark.cli import main
from freemark.errors import (
    AlphaOutsidePolicyError,
    AlreadyRegisteredError,
    CallDeadlineError,
    CallEndedError,
    CryptoError,
    DeadlineExceededError,
    EndpointBudgetRefusal,
    EndpointDeadlineRefusal,
    EndpointInvalidRefusal,
    EndpointNotAllowedRefusal,
    EndpointUnreachableRefusal,
    FreemarkError,
    HostMismatchError,
    InvalidArgumentError,
    InvalidBundleError,
    InvalidModelError,
    LogProofError,
    MalformedRequestError,
    NotFoundError,
    NotUniqueError,
    PanelTooWeakError,
    PermissionDeniedError,
    RateLimitedError,
    ResourceExhaustedError,
    RevokedError,
    SandboxBusyError,
    SandboxCrashedError,
    SandboxLimitError,
    SandboxTimeoutError,
    ServerError,
    ServerInternalError,
    SpoolFullError,
    TooLargeError,
    UnauthenticatedError,
    UploadCorruptError,
    UploadStalledError,
    error_for,
)
from freemark.rpc import KeyServiceClient
from freemark.tlog import merkle, signatures
from freemark.v1 import errors_pb2
from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.rpc.service import _guard

S = grpc.StatusCode

EXPECTED: dict[ErrorCode, type[ServerError]] = {
    ErrorCode.MALFORMED_REQUEST: MalformedRequestError,
    ErrorCode.INVALID_BUNDLE: InvalidBundleError,
    ErrorCode.INVALID_MODEL: InvalidModelError,
    ErrorCode.HOST_MISMATCH: HostMismatchError,
    ErrorCode.NOT_UNIQUE: NotUniqueError,
    ErrorCode.UNAUTHENTICATED: UnauthenticatedError,
    ErrorCode.PERMISSION_DENIED: PermissionDeniedError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.ALREADY_CLAIMED: AlreadyRegisteredError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.SANDBOX_LIMIT: SandboxLimitError,
    ErrorCode.SANDBOX_DEADLINE: SandboxTimeoutError,
    ErrorCode.REVOKED: RevokedError,
    ErrorCode.UPLOAD_CORRUPT: UploadCorruptError,
    ErrorCode.INTERNAL: ServerInternalError,
    ErrorCode.ALPHA_OUTSIDE_POLICY: AlphaOutsidePolicyError,
    ErrorCode.RATE_LIMITED: RateLimitedError,
    ErrorCode.SPOOL_FULL: SpoolFullError,
    ErrorCode.UPLOAD_STALLED: UploadStalledError,
    ErrorCode.SANDBOX_BUSY: SandboxBusyError,
    ErrorCode.SANDBOX_CRASHED: SandboxCrashedError,
    ErrorCode.CALL_ENDED: CallEndedError,
    ErrorCode.CALL_DEADLINE: CallDeadlineError,
    ErrorCode.ENDPOINT_NOT_ALLOWED: EndpointNotAllowedRefusal,
    ErrorCode.ENDPOINT_UNREACHABLE: EndpointUnreachableRefusal,
    ErrorCode.ENDPOINT_DEADLINE: EndpointDeadlineRefusal,
    ErrorCode.ENDPOINT_INVALID: EndpointInvalidRefusal,
    ErrorCode.ENDPOINT_BUDGET: EndpointBudgetRefusal,
    ErrorCode.PANEL_TOO_WEAK: PanelTooWeakError,
}


@dataclass
class Refuser:
    """What the server will refuse the next call with: a catalog code, or a hand-made status."""

    port: int
    codes: list[ErrorCode] = field(default_factory=list)
    statuses: list[status_pb2.Status] = field(default_factory=list)

    def get_public_key(self, request: pb.GetPublicKeyRequest,
                       context: grpc.ServicerContext) -> pb.PublicKey:
        if self.statuses:
            context.abort_with_status(rpc_status.to_status(self.statuses.pop(0)))

        def work() -> pb.PublicKey:
            if self.codes:
                raise ServiceError(self.codes.pop(0), "what to do about it")
            raise RuntimeError("a bug the caller must not see")  # the guard's INTERNAL path

        return _guard(context, "GetPublicKey", work)


@pytest.fixture
def refuser() -> Iterator[Refuser]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    state = Refuser(server.add_insecure_port("127.0.0.1:0"))
    handler = grpc.unary_unary_rpc_method_handler(
        state.get_public_key,
        request_deserializer=pb.GetPublicKeyRequest.FromString,
        response_serializer=pb.PublicKey.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "freemark.v1.KeyService", {"GetPublicKey": handler}),))
    server.start()
    yield state
    server.stop(None)


def _refusal(refuser: Refuser) -> ServerError:
    with KeyServiceClient(f"127.0.0.1:{refuser.port}", token="t0ken", retries=0) as client, \
            pytest.raises(ServerError) as caught:
        client.public_key()
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    return caught.value


def _status(code: grpc.StatusCode, message: str, *infos: error_details_pb2.ErrorInfo
            ) -> status_pb2.Status:
    details = []
    for info in infos:
        detail = any_pb2.Any()
        detail.Pack(info)
        details.append(detail)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.name)
def test_each_catalog_reason_arrives_as_its_named_error(refuser: Refuser, code: ErrorCode) -> None:
    refuser.codes.append(code)
    error = _refusal(refuser)
    assert type(error) is EXPECTED[code]
    assert error.reason == code.name and error.code == code.status
    assert error.message == f"{code.summary}: what to do about it"
    assert str(error) == f"{code.name}: {error.message}"


def test_an_unexpected_server_failure_is_internal_and_opaque(refuser: Refuser) -> None:
    error = _refusal(refuser)
    assert type(error) is ServerInternalError and error.reason == "INTERNAL"
    assert "reference" in error.message and "a bug" not in error.message


def test_every_proto_reason_has_a_client_class_and_back() -> None:
    declared = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    for name in declared:
        cls = type(error_for(S.UNKNOWN, "m", name))
        assert cls is not ServerError and cls.REASON == name, name
    classes = {cls for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, ServerError) and cls.REASON}
    assert {cls.REASON for cls in classes} == declared
    assert set(EXPECTED.values()) == classes


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (S.INVALID_ARGUMENT, InvalidArgumentError),
        (S.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (S.DEADLINE_EXCEEDED, DeadlineExceededError),
        (S.NOT_FOUND, NotFoundError),
        (S.FAILED_PRECONDITION, ServerError),  # not every failed precondition is a revocation
        (S.DATA_LOSS, ServerError),
    ],
)
def test_without_a_reason_the_status_decides(refuser: Refuser, status: grpc.StatusCode,
                                             expected: type[ServerError]) -> None:
    refuser.statuses.append(_status(status, "no details"))
    error = _refusal(refuser)
    assert type(error) is expected and error.reason is None and error.code == status
    assert str(error) == f"no details [{status.name}]"


def test_a_reason_this_client_does_not_know_falls_back_and_is_kept(refuser: Refuser) -> None:
    info = error_details_pb2.ErrorInfo(reason="SOMETHING_NEW", domain="freemark.v1")
    refuser.statuses.append(_status(S.INVALID_ARGUMENT, "newer server", info))
    error = _refusal(refuser)
    assert type(error) is InvalidArgumentError and error.reason == "SOMETHING_NEW"


def test_a_reason_from_another_domain_is_not_ours(refuser: Refuser) -> None:
    foreign = error_details_pb2.ErrorInfo(reason="NOT_UNIQUE", domain="proxy.example.com")
    ours = error_details_pb2.ErrorInfo(reason="HOST_MISMATCH", domain="freemark.v1")
    refuser.statuses.append(_status(S.INVALID_ARGUMENT, "proxy said", foreign))
    refuser.statuses.append(_status(S.INVALID_ARGUMENT, "both", foreign, ours))
    first = _refusal(refuser)
    assert type(first) is InvalidArgumentError and first.reason is None
    assert type(_refusal(refuser)) is HostMismatchError


def test_the_cli_prints_the_reason_on_its_one_line(
    refuser: Refuser, capsys: pytest.CaptureFixture[str]
) -> None:
    refuser.codes.append(ErrorCode.NOT_UNIQUE)
    assert main(["public-key", "--server", f"127.0.0.1:{refuser.port}", "--token", "t0ken"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "freemark: error: NOT_UNIQUE: the key is not specific to the host: what to do about it"
    ]


def test_offline_check_failures_are_freemark_errors() -> None:
    assert issubclass(LogProofError, FreemarkError) and issubclass(CryptoError, FreemarkError)
    assert merkle.LogProofError is LogProofError and signatures.CryptoError is CryptoError
