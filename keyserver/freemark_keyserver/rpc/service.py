"""The gRPC servicer: authenticate, validate, call a plain handler, map errors. Nothing else.

Every refusal is a `ServiceError` from the catalog and goes out as its status with a
google.rpc.ErrorInfo detail; anything unexpected is logged with a reference and goes out
as INTERNAL carrying only that reference.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from freemark.endpoint import EndpointRateLimiter
from freemark.errors import AlignmentLimitError
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver import cancellation
from freemark_keyserver.auth import authenticate
from freemark_keyserver.errors import ErrorCode, ServiceError, abort
from freemark_keyserver.handlers import endpoints, proofs, register, registrations, verify
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.rpc import modelroot
from freemark_keyserver.rpc.ratelimit import RegisterLimits, VerifyLimits
from freemark_keyserver.rpc.uploads import Spool, copied, sha256_of, spooled

log = logging.getLogger("freemark_keyserver")
T = TypeVar("T")
H = TypeVar("H", pb.RegisterHeader, pb.VerifyHeader)


def _guard(context: grpc.ServicerContext, method: str, work: Callable[[], T]) -> T:
    """Run one RPC body, turning every failure into the right status."""
    try:
        with cancellation.bound(context):  # the sandbox and the signer stop when the caller has gone
            return work()
    except ServiceError as exc:
        log.info("%s refused: %s", method, exc.code.name)
        abort(context, exc.code, str(exc), exc.retry_after)
    except AlignmentLimitError as exc:  # a layer too wide to align: judged by shape alone
        log.info("%s refused: %s", method, ErrorCode.SANDBOX_LIMIT.name)
        abort(context, ErrorCode.SANDBOX_LIMIT, f"the model cannot be judged whole: {exc}")
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


class _Stream(Generic[H]):
    """A Register or Verify request stream as its handler reads it (`handlers.context.Stream`):
    the header, then each file's chunks spooled when the handler asks. Reading a file stops
    at the next `reference` part (Register's), so each file is spooled, size- and
    hash-checked on its own. A file named by `model_path` is read by the server from its
    model root (`modelroot`) instead, copied into the same spool, and no chunk may come for
    it; with `hash_named` (Verify, whose verdict signs the suspect's SHA-256) the sealed copy
    is hashed in a thread while the handler runs the sandbox on it (`settle` waits for it).
    Register binds its host by the weights' fingerprint the sandbox computes, so a named
    host is not hashed at all."""

    def __init__(self, requests: Iterator[pb.RegisterRequest] | Iterator[pb.VerifyRequest],
                 header_type: type[H], spool: Spool, cap: int, *, principal: str,
                 misplaced: str, model_root: Path | None = None,
                 hash_named: bool = False) -> None:
        self._requests: Iterator[pb.RegisterRequest | pb.VerifyRequest] = requests
        self._header_type: type[H] = header_type
        self._spool, self._cap, self._principal = spool, cap, principal
        self._model_root, self._hash_named = model_root, hash_named
        self._hashing: list[tuple[pb.UploadHeader, Future[bytes]]] = []
        self._misplaced = misplaced  # the refusal of a part that may not come where it did
        self._next: pb.UploadHeader | None = None
        self._sha256: bytes | None = None  # the current file's deferred SHA-256, once sent

    def header(self) -> H:
        first = next(self._requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "the stream must start with a header")
        header = first.header
        assert isinstance(header, self._header_type)
        return header

    def receive(self, upload: pb.UploadHeader, *, suffix: str
                ) -> AbstractContextManager[Path]:
        if upload.model_path:
            return self._named(upload, suffix)
        return spooled(self._chunks(), upload, cap=self._cap, spool=self._spool,
                       principal=self._principal, suffix=suffix, deferred=lambda: self._sha256)

    @contextmanager
    def _named(self, upload: pb.UploadHeader, suffix: str) -> Iterator[Path]:
        """The file `upload.model_path` names under the model root (`modelroot.open_named`),
        copied into sealed memory or the spool (`uploads.copied`): its size is written into
        `upload` at once, its SHA-256 (Verify only) once `settle` has waited for the hash of
        the copy, which runs while the block does and is joined before the copy is freed."""
        if upload.total_size or upload.sha256:
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "a file named by model_path is "
                               "measured by the server: leave total_size and sha256 unset")
        for _ in self._chunks():
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "send no chunk for a file named "
                               "by model_path: the server reads it")
        if self._sha256 is not None:
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "send no sha256 part for a file "
                               "named by model_path: the server hashes what it reads")
        fd = modelroot.open_named(self._model_root, upload.model_path)
        try:
            upload.total_size = os.fstat(fd).st_size
            if upload.total_size == 0:
                raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                                   f"model_path {upload.model_path!r}: the file is empty")
            with copied(fd, upload, cap=self._cap, spool=self._spool,
                        principal=self._principal, suffix=suffix) as path:
                if not self._hash_named:
                    yield path
                    return
                with ThreadPoolExecutor(1, thread_name_prefix="freemark-hash") as hasher:
                    self._hashing.append((upload, hasher.submit(sha256_of, path)))
                    yield path  # the executor's exit joins the hash before the copy goes
        finally:
            os.close(fd)

    def settle(self) -> None:
        """Write each named file's SHA-256 into its header, waiting for its hash (raises
        what hashing raised)."""
        for upload, digest in self._hashing:
            upload.sha256 = digest.result()
        self._hashing.clear()

    def next_upload(self) -> pb.UploadHeader | None:
        header, self._next = self._next, None
        return header

    def _chunks(self) -> Iterator[bytes]:
        """The current file's bytes, up to the next `reference` part or the end; a `sha256`
        part (the file's deferred hash) may come after its last chunk, and only once."""
        self._sha256 = None
        for request in self._requests:
            part = request.WhichOneof("part")
            if part == "chunk" and self._sha256 is None:
                yield request.chunk
            elif part == "sha256" and self._sha256 is None:
                self._sha256 = request.sha256
            elif part in ("chunk", "sha256"):
                raise ServiceError(ErrorCode.MALFORMED_REQUEST, "a file's sha256 part comes "
                                   "once, after its last chunk")
            elif part == "reference":
                assert isinstance(request, pb.RegisterRequest)
                self._next = request.reference
                return
            else:
                raise ServiceError(ErrorCode.MALFORMED_REQUEST, self._misplaced)


class KeyServiceServicer(keyservice_pb2_grpc.KeyServiceServicer):
    """Thin adapter from gRPC to `handlers`: one handler per RPC."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.spool = Spool(ctx.config.spool_dir, ctx.config.spool_quota_bytes,
                           ctx.config.spool_principal_share, ctx.config.spool_memory_bytes)
        self.verify_limits = VerifyLimits(ctx.config.verify_rate_principal,
                                          ctx.config.verify_rate_registration)
        self.register_limits = RegisterLimits(ctx.config.register_rate_principal)
        # Each endpoint's inputs per hour, across every VerifyEndpoint of this server.
        self.endpoint_limiter = EndpointRateLimiter(ctx.config.endpoint_policy)

    def Register(self, request_iterator: Iterator[pb.RegisterRequest],
                 context: grpc.ServicerContext) -> pb.Receipt:
        def work() -> pb.Receipt:
            principal = authenticate(self.ctx.store, context)
            # Charged before the upload is read: every Register attempt costs its caller.
            self.register_limits.check_principal(principal.name)
            stream = _Stream(request_iterator, pb.RegisterHeader, self.spool,
                             self.ctx.config.max_upload_bytes, principal=principal.name,
                             misplaced="a Register stream has one header, at its start",
                             model_root=self.ctx.config.model_root)
            return register.register(self.ctx, principal, stream)
        return _guard(context, "Register", work)

    def Verify(self, request_iterator: Iterator[pb.VerifyRequest],
               context: grpc.ServicerContext) -> pb.SignedVerdict:
        def work() -> pb.SignedVerdict:
            principal = authenticate(self.ctx.store, context)
            # The caller's own bucket is charged before anything is read; the registration's
            # only once the upload has completed (`handlers.verify`), so a header-only call
            # costs its caller and never the registration's owner.
            self.verify_limits.check_principal(principal.name)
            stream = _Stream(request_iterator, pb.VerifyHeader, self.spool,
                             self.ctx.config.max_upload_bytes, principal=principal.name,
                             misplaced="only chunks may follow the header",
                             model_root=self.ctx.config.model_root, hash_named=True)
            return verify.verify(self.ctx, principal, stream,
                                 admit=self.verify_limits.admission(principal.name))
        return _guard(context, "Verify", work)

    def VerifyEndpoint(self, request: pb.VerifyEndpointRequest,
                       context: grpc.ServicerContext) -> pb.EndpointVerdict:
        def work() -> pb.EndpointVerdict:
            principal = authenticate(self.ctx.store, context)
            self.verify_limits.check_principal(principal.name)  # as a Verify costs its caller
            return endpoints.verify_endpoint(
                self.ctx, principal, request, admit=self.verify_limits.admission(principal.name),
                limiter=self.endpoint_limiter)
        return _guard(context, "VerifyEndpoint", work)

    def GetRegistration(self, request: pb.GetRegistrationRequest,
                        context: grpc.ServicerContext) -> pb.RegistrationInfo:
        return _guard(context, "GetRegistration", lambda: registrations.get_registration(
            self.ctx, authenticate(self.ctx.store, context), request))

    def ListRegistrations(self, request: pb.ListRegistrationsRequest,
                          context: grpc.ServicerContext) -> pb.ListRegistrationsResponse:
        return _guard(context, "ListRegistrations", lambda: registrations.list_registrations(
            self.ctx, authenticate(self.ctx.store, context), request))

    def Revoke(self, request: pb.RevokeRequest, context: grpc.ServicerContext) -> pb.RegistrationInfo:
        return _guard(context, "Revoke", lambda: registrations.revoke(
            self.ctx, authenticate(self.ctx.store, context), request))

    def GetCheckpoint(self, request: pb.GetCheckpointRequest,
                      context: grpc.ServicerContext) -> pb.SignedCheckpoint:
        def work() -> pb.SignedCheckpoint:
            authenticate(self.ctx.store, context)
            return proofs.get_checkpoint(self.ctx)
        return _guard(context, "GetCheckpoint", work)

    def GetInclusionProof(self, request: pb.GetInclusionProofRequest,
                          context: grpc.ServicerContext) -> pb.InclusionProof:
        def work() -> pb.InclusionProof:
            authenticate(self.ctx.store, context)
            return proofs.get_inclusion_proof(self.ctx, request)
        return _guard(context, "GetInclusionProof", work)

    def GetConsistencyProof(self, request: pb.GetConsistencyProofRequest,
                            context: grpc.ServicerContext) -> pb.ConsistencyProof:
        def work() -> pb.ConsistencyProof:
            authenticate(self.ctx.store, context)
            return proofs.get_consistency_proof(self.ctx, request)
        return _guard(context, "GetConsistencyProof", work)

    def GetEntries(self, request: pb.GetEntriesRequest,
                   context: grpc.ServicerContext) -> pb.GetEntriesResponse:
        def work() -> pb.GetEntriesResponse:
            authenticate(self.ctx.store, context)
            return proofs.get_entries(self.ctx, request)
        return _guard(context, "GetEntries", work)

    def GetPublicKey(self, request: pb.GetPublicKeyRequest,
                     context: grpc.ServicerContext) -> pb.PublicKey:
        def work() -> pb.PublicKey:
            authenticate(self.ctx.store, context)
            return proofs.public_key(self.ctx)
        return _guard(context, "GetPublicKey", work)
