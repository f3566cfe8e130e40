"""The gRPC servicer: authenticate, validate, call a plain handler, map errors. Nothing else.

Every refusal is a `ServiceError` from the catalog and goes out as its status with a
google.rpc.ErrorInfo detail; anything unexpected is logged with a reference and goes out
as INTERNAL carrying only that reference.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import grpc

from freemark.formats.table import by_wire
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver import cancellation
from freemark_keyserver.auth import authenticate
from freemark_keyserver.errors import ErrorCode, ServiceError, abort
from freemark_keyserver.handlers import flows, panels
from freemark_keyserver.rpc.ratelimit import VerifyLimits
from freemark_keyserver.rpc.uploads import Spool, spooled

log = logging.getLogger("freemark_keyserver")
T = TypeVar("T")


def _guard(context: grpc.ServicerContext, method: str, work: Callable[[], T]) -> T:
    """Run one RPC body, turning every failure into the right status."""
    try:
        with cancellation.bound(context):  # the sandbox and the signer stop when the caller has gone
            return work()
    except ServiceError as exc:
        log.info("%s refused: %s", method, exc.code.name)
        abort(context, exc.code, str(exc), exc.retry_after)
    except cancellation.CallEnded as exc:
        log.info("%s ended by the caller: %s", method, exc)
        abort(context, ErrorCode.CALL_DEADLINE if exc.why == "deadline" else ErrorCode.CALL_ENDED,
              str(exc))
    except Exception:
        reference = secrets.token_hex(6)
        log.exception("%s failed unexpectedly (reference %s)", method, reference)
        abort(context, ErrorCode.INTERNAL,
               f"internal error (reference {reference}); the operator's log has the details")
    raise AssertionError("unreachable: abort raises")


def _header(requests: Iterator[pb.RegisterRequest] | Iterator[pb.VerifyRequest]) -> object:
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "the stream must start with a header")
    return first.header


def _chunks(requests: Iterator[pb.RegisterRequest] | Iterator[pb.VerifyRequest]) -> Iterator[bytes]:
    for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "only chunks may follow the header")
        yield request.chunk


def _suffix(wire_format: int) -> str:
    """The spool suffix of an upload whose format the handler has admitted."""
    row = by_wire(wire_format)
    assert row is not None  # parse_bundle and verify_target refuse unknown formats
    return row.suffix


class _RegisterStream:
    """The parts of a Register stream after its header: the host's chunks, then each
    reference's header and chunks. Reading stops at a part boundary so each file is
    spooled, size- and hash-checked on its own."""

    def __init__(self, requests: Iterator[pb.RegisterRequest]) -> None:
        self._requests = requests
        self._next: pb.UploadHeader | None = None

    def chunks(self) -> Iterator[bytes]:
        """The current file's bytes, up to the next `reference` part or the end."""
        for request in self._requests:
            part = request.WhichOneof("part")
            if part == "chunk":
                yield request.chunk
            elif part == "reference":
                self._next = request.reference
                return
            else:
                raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                                   "a Register stream has one header, at its start")

    def next_reference(self) -> pb.UploadHeader | None:
        """The header of the reference that follows, None at the end of the stream."""
        header, self._next = self._next, None
        return header


class KeyServiceServicer(keyservice_pb2_grpc.KeyServiceServicer):
    """Thin adapter from gRPC to `handlers`."""

    def __init__(self, ctx: flows.Context) -> None:
        self.ctx = ctx
        self.spool = Spool(ctx.config.spool_dir, ctx.config.spool_quota_bytes)
        self.verify_limits = VerifyLimits(ctx.config.verify_rate_principal,
                                          ctx.config.verify_rate_registration)

    def Register(self, request_iterator: Iterator[pb.RegisterRequest],
                 context: grpc.ServicerContext) -> pb.Receipt:
        def work() -> pb.Receipt:
            principal = authenticate(self.ctx.store, context)
            flows.require_role(principal, flows.OWNER)
            header = _header(request_iterator)
            assert isinstance(header, pb.RegisterHeader)
            bundle = flows.parse_bundle(self.ctx, principal, header)
            stream = _RegisterStream(request_iterator)
            config = self.ctx.config
            with ExitStack() as files:
                host = files.enter_context(spooled(
                    stream.chunks(), header.upload, cap=config.max_upload_bytes,
                    spool=self.spool, suffix=_suffix(header.upload.format)))
                references: list[Path] = []
                while (reference := stream.next_reference()) is not None:
                    if len(references) == config.max_references:
                        raise ServiceError(ErrorCode.TOO_LARGE, f"at most {config.max_references} "
                                           "reference models per registration")
                    panels.check_reference_header(reference)
                    references.append(files.enter_context(spooled(
                        stream.chunks(), reference, cap=config.max_upload_bytes,
                        spool=self.spool, suffix=panels.REFERENCE_FORMAT.suffix)))
                return flows.register(self.ctx, principal, bundle, host, references,
                                         host_format=header.upload.format)
        return _guard(context, "Register", work)

    def Verify(self, request_iterator: Iterator[pb.VerifyRequest],
               context: grpc.ServicerContext) -> pb.SignedVerdict:
        def work() -> pb.SignedVerdict:
            principal = authenticate(self.ctx.store, context)
            # Both buckets are charged before the upload is read: a refused call costs nothing.
            self.verify_limits.check_principal(principal.name)
            header = _header(request_iterator)
            assert isinstance(header, pb.VerifyHeader)
            record = flows.verify_target(self.ctx, principal, header)
            self.verify_limits.check_registration(record.registration_id)
            suffix = _suffix(header.upload.format)
            with spooled(_chunks(request_iterator), header.upload, cap=self.ctx.config.max_upload_bytes,
                         spool=self.spool, suffix=suffix) as path:
                return flows.verify(self.ctx, principal, record, header, path)
        return _guard(context, "Verify", work)

    def GetRegistration(self, request: pb.GetRegistrationRequest,
                        context: grpc.ServicerContext) -> pb.RegistrationInfo:
        return _guard(context, "GetRegistration", lambda: flows.get_registration(
            self.ctx, authenticate(self.ctx.store, context), request))

    def ListRegistrations(self, request: pb.ListRegistrationsRequest,
                          context: grpc.ServicerContext) -> pb.ListRegistrationsResponse:
        return _guard(context, "ListRegistrations", lambda: flows.list_registrations(
            self.ctx, authenticate(self.ctx.store, context), request))

    def Revoke(self, request: pb.RevokeRequest, context: grpc.ServicerContext) -> pb.RegistrationInfo:
        return _guard(context, "Revoke", lambda: flows.revoke(
            self.ctx, authenticate(self.ctx.store, context), request))

    def GetCheckpoint(self, request: pb.GetCheckpointRequest,
                      context: grpc.ServicerContext) -> pb.SignedCheckpoint:
        def work() -> pb.SignedCheckpoint:
            authenticate(self.ctx.store, context)
            return flows.get_checkpoint(self.ctx)
        return _guard(context, "GetCheckpoint", work)

    def GetInclusionProof(self, request: pb.GetInclusionProofRequest,
                          context: grpc.ServicerContext) -> pb.InclusionProof:
        def work() -> pb.InclusionProof:
            authenticate(self.ctx.store, context)
            return flows.get_inclusion_proof(self.ctx, request)
        return _guard(context, "GetInclusionProof", work)

    def GetConsistencyProof(self, request: pb.GetConsistencyProofRequest,
                            context: grpc.ServicerContext) -> pb.ConsistencyProof:
        def work() -> pb.ConsistencyProof:
            authenticate(self.ctx.store, context)
            return flows.get_consistency_proof(self.ctx, request)
        return _guard(context, "GetConsistencyProof", work)

    def GetEntries(self, request: pb.GetEntriesRequest,
                   context: grpc.ServicerContext) -> pb.GetEntriesResponse:
        def work() -> pb.GetEntriesResponse:
            authenticate(self.ctx.store, context)
            return flows.get_entries(self.ctx, request)
        return _guard(context, "GetEntries", work)

    def GetPublicKey(self, request: pb.GetPublicKeyRequest,
                     context: grpc.ServicerContext) -> pb.PublicKey:
        def work() -> pb.PublicKey:
            authenticate(self.ctx.store, context)
            return flows.public_key(self.ctx)
        return _guard(context, "GetPublicKey", work)
