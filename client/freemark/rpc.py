"""`KeyServiceClient`: the library's one way to talk to the trusted third party (TTP).

Everything about the transport lives here and nowhere else: TLS (on unless the server is on
this machine), the bearer token, a deadline on every call, retries with exponential backoff
and jitter on UNAVAILABLE only (a refused key or a bad model will not improve by asking
again), streamed uploads read lazily from disk, and the one conversion of `grpc.RpcError`
into this library's error tree. Results come back as the frozen records of `freemark.records.types`.

Quick start::

    with KeyServiceClient("ttp.example.com:443", token=os.environ["FREEMARK_TOKEN"]) as ttp:
        receipt = ttp.register(load_bundle("model.fmk"), Path("model.pt2"))
        verdict = ttp.verify(receipt.registration_id, Path("suspect.pt2"))
        verify_receipt(verdict, ttp.public_key())   # better: a public key obtained out of band
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import ipaddress
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tqdm.auto import tqdm

from freemark.blackbox.key import OutputKey, encode_output_key
from freemark.errors import (
    ERROR_DOMAIN,
    FreemarkError,
    InvalidInputError,
    LogProofError,
    TransportError,
    error_for,
)
from freemark.formats import table
from freemark.formats.local import upload_source
from freemark.formats.packing import Packed
from freemark.records.types import (
    AnyEndpointVerdict,
    AnyVerdict,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    Receipt,
    RegistrationInfo,
    SignedStatement,
)
from freemark.records.wire import (
    checkpoint_from_proto,
    consistency_from_proto,
    endpoint_verdict_from_proto,
    entries_from_proto,
    inclusion_from_proto,
    receipt_from_proto,
    registration_from_proto,
    verdict_from_proto,
)
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.bundle import to_proto as bundle_to_proto
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "KeyServiceClient",
    "ModelFormat",
    "ServerModel",
    "error_from_rpc",
    "is_loopback",
    "recycle_chunk_memory",
]

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message cap
DEFAULT_BACKOFF_S = 0.5  # first retry delay; doubled per retry, jittered
MAX_BACKOFF_S = 10.0
MAX_PAGE_SIZE = 100  # the server's limit (proto: ListRegistrationsRequest.page_size)
# glibc's mallopt parameter, and the size below which allocations come from the heap
# (`recycle_chunk_memory`): a few chunks, far below what a model's tensors need.
_M_MMAP_THRESHOLD = -3
CHUNK_HEAP_THRESHOLD = 4 * DEFAULT_CHUNK_SIZE

ModelFormat = Literal["pt2", "safetensors", "hf", "lora", "onnx", "gguf"]  # a row name of formats.table

T = TypeVar("T")


def recycle_chunk_memory() -> bool:
    """Make this process's C allocator recycle upload-sized buffers instead of mapping each.

    Every chunk of an upload is copied several times on each side (read into bytes, wrapped
    in a message, serialized, handed to gRPC; received, parsed), each copy into a fresh
    1 MiB buffer. glibc maps a buffer that size with its own mmap and unmaps it when freed,
    so every copy page-faults and zeroes 256 new pages: 1.4 s per 2.2 GB copied here,
    against 0.2 s when the buffers come from the heap and are reused (issue 20: most of a
    1.1 B-parameter decoder's upload time). Called by the processes freemark owns (the
    `freemark` command, the key server); a program that uploads large models through this
    library in its own process may call it too. Returns False where the C library has no
    `mallopt` (not glibc): nothing is changed there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, CHUNK_HEAP_THRESHOLD))


def error_from_rpc(error: grpc.RpcError, target: str) -> FreemarkError:
    """The library error for a failed call: `TransportError` for UNAVAILABLE, else the
    `ServerError` of the reason in the status's `google.rpc.ErrorInfo` (by status when there is
    none), keeping the code, the reason and the server's message."""
    code: grpc.StatusCode = error.code()  # a grpc.Call in practice
    details: str = error.details() or code.name.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        return TransportError(f"cannot reach the key server at {target}: {details}")
    return error_for(code, details, _reason(error))


def _reason(error: grpc.RpcError) -> str | None:
    """The `ErrorReason` name in a failed call's rich status, if it carries one of ours.

    A status without details (a proxy, grpc itself, an older server), one whose details do not
    parse, or an ErrorInfo from another domain gives None: the caller falls back to the code.
    """
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a grpc.Call in practice
        if status is None:
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info.reason or None
    # not a Call, trailers that contradict the status, or details that do not parse
    except (AttributeError, ValueError, DecodeError):
        return None
    return None


def is_loopback(target: str) -> bool:
    """Whether a `host:port` target names this machine (where plaintext is acceptable)."""
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or "]" in target else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same(request: T) -> T:
    """A request factory for `functools.partial`: unary requests are reused across retries."""
    return request


@dataclass(frozen=True)
class ServerModel:
    """A model the key server reads itself instead of an upload: `path` under its operator's
    model root (`serve --model-root`, a hub's read-only mirror, say), plain names joined by
    "/", and its format (`fmt`, a row name of `formats.table`: the client cannot look at a
    file it does not hold). Nothing is sent; the server copies the file once while hashing
    it, and the verdict or receipt names that copy's SHA-256 and size
    (`UploadHeader.model_path`, docs/keyserver.md)."""

    path: str
    fmt: ModelFormat


def _format_of(path: Path | ServerModel, fmt: ModelFormat | None) -> table.ModelFormat:
    """The format row of an upload: the one named, else the one the path is."""
    if isinstance(path, ServerModel):
        return table.by_name(path.fmt)
    return table.by_name(fmt) if fmt else table.detect(path)


def _name(model: Path | ServerModel) -> Path:
    """What messages call a model: its local path, or its path under the server's root."""
    return Path(model.path) if isinstance(model, ServerModel) else Path(model)


class _Upload:
    """A model as an upload, read once per attempt: hashed while it is sent.

    The source is a file, or a checkpoint's packed bytes produced from its memory-mapped
    shards as they are read (`formats.packing`: never written to a temporary file). The
    header announces the size and defers the SHA-256 to a `sha256` part after the last chunk
    (`UploadHeader.sha256`), so the bytes are read once, as gRPC asks for each chunk, and
    memory stays at one chunk whatever the model size. A read error inside gRPC's request
    thread would surface as a bare CANCELLED status, so it is kept here and reported as what
    it is.
    """

    def __init__(self, source: Path | Packed | ServerModel, name: Path,
                 fmt: pb.ModelFormat.ValueType, chunk_size: int, progress: bool) -> None:
        self.source, self.path = source, name
        self.chunk_size = chunk_size
        self.read_error: OSError | None = None
        if isinstance(source, ServerModel):  # named, not sent: the header alone
            self.header = pb.UploadHeader(model_path=source.path, format=fmt)
            self.bar = tqdm(disable=True)
            return
        try:
            size = source.stat().st_size if isinstance(source, Path) else source.size
        except OSError as exc:
            raise InvalidInputError(f"{name}: {exc.strerror or exc}") from exc
        self.header = pb.UploadHeader(total_size=size, format=fmt)
        self.bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"uploading {name.name}", leave=False, disable=not progress)

    def _chunks(self) -> Iterator[bytes]:
        if isinstance(self.source, ServerModel):
            return
        if not isinstance(self.source, Path):
            yield from self.source.chunks(self.chunk_size)
            return
        with self.source.open("rb") as handle:
            while chunk := handle.read(self.chunk_size):
                yield chunk

    def requests(self, first: T, wrap: Callable[[bytes], T], digest: Callable[[bytes], T]
                 ) -> Iterator[T]:
        """One attempt's request stream: `first` (the header), then every chunk from byte 0
        (`wrap`), then their SHA-256 (`digest`)."""
        self.bar.reset()
        yield first
        if isinstance(self.source, ServerModel):  # the server reads and hashes it
            return
        hashed = hashlib.sha256()
        try:
            for chunk in self._chunks():
                hashed.update(chunk)
                self.bar.update(len(chunk))
                yield wrap(chunk)
        except OSError as exc:
            self.read_error = exc
            raise
        yield digest(hashed.digest())

    def close(self) -> None:
        """Remove the progress bar."""
        self.bar.close()


class KeyServiceClient:
    """A connection to the key server; every method is one RPC with a deadline and retries.

    `tls=None` means TLS unless the target is loopback; `tls=False` sends in plaintext
    (the token too), so use it only on a trusted network. `root_certificates` (PEM) replaces
    the system roots, for a server with a private CA; `client_cert` and `client_key` (PEM)
    enable mTLS. `timeout` is each attempt's deadline in seconds; `retries` is how many times
    an UNAVAILABLE call is retried, after `backoff` seconds, doubled each time, with jitter.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: bool = False,
        backoff: float = DEFAULT_BACKOFF_S,
    ) -> None:
        if timeout <= 0 or retries < 0 or chunk_size <= 0 or backoff < 0:
            raise InvalidInputError("timeout and chunk_size must be > 0, retries and backoff >= 0")
        if (client_cert is None) != (client_key is None):
            raise InvalidInputError("mTLS needs both client_cert and client_key")
        use_tls = not is_loopback(target) if tls is None else tls
        if not use_tls and (root_certificates or client_cert):
            raise InvalidInputError("certificates were given but TLS is off")
        self._target = target
        self._timeout = timeout
        self._retries = retries
        self._chunk_size = chunk_size
        self._progress = progress
        self._backoff = backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.primary_user_agent", "freemark-client")]  # names us in server logs
        if use_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=client_key,
                certificate_chain=client_cert,
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.KeyServiceStub(self._channel)

    # --- transport ---------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: clients that failed together do not retry together."""
        ceiling = min(MAX_BACKOFF_S, self._backoff * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _call(self, method: Callable[..., T], make_request: Callable[[], Any],
              uploads: Sequence[_Upload] = ()) -> T:
        """Run one RPC with its deadline, retrying UNAVAILABLE; the only place errors convert.

        `make_request` builds the request afresh per attempt, so a streamed upload is
        re-sent from its first byte.
        """
        attempt = 0
        while True:
            try:
                return method(make_request(), timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                for upload in uploads:
                    if upload.read_error is not None:
                        raise InvalidInputError(
                            f"{upload.path}: read failed during upload: "
                            f"{upload.read_error.strerror or upload.read_error}"
                        ) from upload.read_error
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE
                if not retry or attempt >= self._retries:
                    raise error_from_rpc(exc, self._target) from exc
            time.sleep(self._delay(attempt))
            attempt += 1

    def _stream(self, method: Callable[..., T], source: Path | Packed | ServerModel, name: Path,
                fmt: pb.ModelFormat.ValueType, first: Callable[[pb.UploadHeader], Any],
                wrap: Callable[[bytes], Any], digest: Callable[[bytes], Any]) -> T:
        upload = _Upload(source, name, fmt, self._chunk_size, self._progress)
        try:
            header = first(upload.header)
            return self._call(method, lambda: upload.requests(header, wrap, digest), [upload])
        finally:
            upload.close()

    # --- registrations -----------------------------------------------------------------------

    def register(self, bundle: KeyBundle, model_path: Path | ServerModel, *,
                 references: Sequence[Path] = (), output_key: OutputKey | None = None
                 ) -> Receipt:
        """Register a key for the host model (a .pt2 program or a Hugging Face checkpoint
        directory, packed into one file for the upload; or a `ServerModel`, a file the key
        server reads under its model root): the TTP re-extracts, signs and logs it.

        `references` (.pt2 programs, or checkpoints beside a checkpoint host) are the
        registration's reference panel: models of the host's architecture trained
        independently of it, which calibrate the aligned test that sees through relabelled,
        rescaled or padded copies (at least 3; 5 or more recommended). They are fixed at
        registration. Raises `AlreadyRegisteredError` if an earlier registration already
        claims the model.

        `output_key` (of the same host, a .pt2 program) makes one registration hold both key
        kinds: `references` then also carry the output key's panel (the TTP tells them from
        the white-box key's references by their weights), the receipt commits to its query
        sets, and a Verify of a model file judges every test of both keys.
        """
        host_format = _format_of(
            model_path if isinstance(model_path, ServerModel) else Path(model_path), None)
        if not host_format.host:
            raise InvalidInputError(f"{model_path}: a host is {table.names(table.HOSTS)}")
        kinds = [_format_of(Path(path), None) for path in references]
        for path, kind in zip(references, kinds):
            if kind.wire not in (pb.MODEL_FORMAT_PT2, host_format.wire):
                raise InvalidInputError(f"{path}: references are .pt2 programs, or checkpoints "
                                        "beside a checkpoint host")
        message = bundle_to_proto(bundle)
        host = model_path if isinstance(model_path, ServerModel) else upload_source(model_path)
        uploads = [_Upload(host, _name(model_path), host_format.wire,
                           self._chunk_size, self._progress),
                   *(_Upload(upload_source(r), Path(r), kind.wire, self._chunk_size,
                             self._progress) for r, kind in zip(references, kinds))]
        key: dict[str, Any] = {"bundle": message}
        if output_key is not None:
            key["output_key"] = encode_output_key(output_key)
        return self._register(key, uploads)

    def register_output_key(self, key: OutputKey, model_path: Path, *,
                            references: Sequence[Path]) -> Receipt:
        """Register an output key (`freemark.blackbox`) for its host, a .pt2 program.

        `references` are the panel the key was derived against (the `keygen --outputs
        --reference` models, at least 8 of at least 2 architectures): the TTP reads them in
        its sandbox and fits the null on their answers itself. The receipt commits to every
        query set (`Receipt.query_sets`). Raises `AlreadyRegisteredError` if an earlier
        registration already claims the model.
        """
        for path in (model_path, *references):
            if _format_of(Path(path), None).wire != pb.MODEL_FORMAT_PT2:
                raise InvalidInputError(f"{path}: an output key's host and references are "
                                        ".pt2 programs")
        uploads = [_Upload(Path(p), Path(p), pb.MODEL_FORMAT_PT2, self._chunk_size,
                           self._progress)
                   for p in (model_path, *references)]
        return self._register({"output_key": encode_output_key(key)}, uploads)

    def _register(self, key: dict[str, Any], uploads: list[_Upload]) -> Receipt:
        """One Register stream: the header (its key, and the host's upload), then each
        reference."""

        def requests() -> Iterator[pb.RegisterRequest]:
            first = pb.RegisterRequest(header=pb.RegisterHeader(**key,
                                                                upload=uploads[0].header))
            def chunk(data: bytes) -> pb.RegisterRequest:
                return pb.RegisterRequest(chunk=data)

            def digest(sha256: bytes) -> pb.RegisterRequest:
                return pb.RegisterRequest(sha256=sha256)

            yield from uploads[0].requests(first, chunk, digest)
            for upload in uploads[1:]:
                yield from upload.requests(pb.RegisterRequest(reference=upload.header), chunk,
                                           digest)

        try:
            reply = self._call(self._stub.Register, requests, uploads)
        finally:
            for upload in uploads:
                upload.close()
        return receipt_from_proto(reply)

    def verify(self, registration_id: str, model_path: Path | ServerModel, *,
               fmt: ModelFormat | None = None,
               alpha: float | None = None, onnx_tensor: str | None = None,
               adapter: Path | None = None) -> AnyVerdict:
        """Ask the TTP whether a suspect model carries a registration's watermark.

        The suspect is a .pt2 program, a Hugging Face checkpoint directory (packed into one
        file for the upload), a .onnx model, .safetensors weights, which the server
        applies to the architecture registered with the host, or a .gguf file, which the
        server dequantizes into the registered checkpoint's architecture (it must match);
        `fmt` overrides what the path says. A `ServerModel` is not sent: the key server reads
        that file under its model root (its own format, no `adapter`). For an ONNX graph the server locates the key layer itself among every candidate
        tensor and the verdict names the one it read (`reading`); `onnx_tensor` adds one
        tensor to the candidates, never replacing them. With `adapter` (a PEFT LoRA adapter
        directory), `model_path` is its base checkpoint directory: both are packed into one
        file and the server merges them in its sandbox. `alpha` defaults to the scheme's (1e-9); the server refuses
        one outside its verdict policy (`AlphaOutsidePolicyError`). The verdict is a full
        `SignedVerdict`, or a `CoarseVerdict` (outcome and p-value bucket) where the server's
        policy gives those to requesters other than the registration's owner.
        """
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise InvalidInputError(f"alpha must be in (0, 1), got {alpha}")
        if isinstance(model_path, ServerModel) and (adapter is not None or fmt is not None):
            raise InvalidInputError("a model the server reads carries its own format, and an "
                                    "adapter is sent with a local base checkpoint only")
        named = model_path if isinstance(model_path, ServerModel) else None
        path = _name(model_path)
        kind = _format_of(named or path, "lora" if adapter is not None else fmt).wire
        if onnx_tensor and kind != pb.MODEL_FORMAT_ONNX:
            raise InvalidInputError("--onnx-tensor is for ONNX suspects only")
        if adapter is not None and fmt not in (None, "lora"):
            raise InvalidInputError("an adapter is sent with its base checkpoint directory only")
        reply = self._stream(
            self._stub.Verify, named or upload_source(path, adapter=adapter), path, kind,
            lambda upload: pb.VerifyRequest(header=pb.VerifyHeader(
                registration_id=registration_id, upload=upload, alpha=alpha or 0.0,
                onnx_tensor=onnx_tensor or "")),
            lambda chunk: pb.VerifyRequest(chunk=chunk),
            lambda sha256: pb.VerifyRequest(sha256=sha256),
        )
        return verdict_from_proto(reply)

    def verify_endpoint(self, registration_id: str, endpoint: str, model_name: str, *,
                        labels_only: bool = False, alpha: float | None = None
                        ) -> AnyEndpointVerdict:
        """Ask the TTP to judge the model behind a live Open Inference Protocol v2 endpoint
        (`endpoint`: http(s)://host:port, which the TTP's operator must allow-list) with a
        registration's output key: a signed, logged `EndpointVerdict` that binds the
        endpoint, the model's name and version, the query set and every body's SHA-256.
        A refused endpoint raises the `ServerError` of its ENDPOINT_* reason; nothing is
        signed then. A requester other than the registration's owner gets a
        `CoarseEndpointVerdict` (outcome and p-value bucket) where the server's policy says
        so, as for `verify`."""
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise InvalidInputError(f"alpha must be in (0, 1), got {alpha}")
        request = pb.VerifyEndpointRequest(registration_id=registration_id, endpoint=endpoint,
                                           model_name=model_name, labels_only=labels_only,
                                           alpha=alpha or 0.0)
        reply = self._call(self._stub.VerifyEndpoint, lambda: request)
        return endpoint_verdict_from_proto(reply)

    def get_registration(self, registration_id: str) -> RegistrationInfo:
        """One registration's metadata (never the key, triggers or watermark)."""
        request = pb.GetRegistrationRequest(registration_id=registration_id)
        return registration_from_proto(self._call(self._stub.GetRegistration, lambda: request))

    def list_registrations(self, page_size: int = 20) -> Iterator[RegistrationInfo]:
        """Every registration visible to the caller, fetching pages lazily as iterated."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidInputError(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
        token = ""
        while True:
            request = pb.ListRegistrationsRequest(page_size=page_size, page_token=token)
            page = self._call(self._stub.ListRegistrations, functools.partial(_same, request))
            yield from (registration_from_proto(info) for info in page.registrations)
            token = page.next_page_token
            if not token:
                return

    def revoke(self, registration_id: str, reason: str = "") -> RegistrationInfo:
        """Revoke a registration; it stays in the log, and later verifies are refused."""
        request = pb.RevokeRequest(registration_id=registration_id, reason=reason)
        return registration_from_proto(self._call(self._stub.Revoke, lambda: request))

    # --- the log -----------------------------------------------------------------------------

    def get_checkpoint(self) -> Checkpoint:
        """The latest signed checkpoint (check it with `freemark.audit.receipt.verify_checkpoint`)."""
        reply = self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest)
        return checkpoint_from_proto(reply)

    def get_inclusion_proof(self, index: int, tree_size: int = 0) -> InclusionProof:
        """Proof that entry `index` is in the tree of `tree_size` entries (0: the latest)."""
        request = pb.GetInclusionProofRequest(log_index=index, tree_size=tree_size)
        return inclusion_from_proto(self._call(self._stub.GetInclusionProof, lambda: request))

    def get_consistency_proof(self, old_size: int, new_size: int = 0) -> ConsistencyProof:
        """Proof that the log of `old_size` entries is a prefix of the one of `new_size`."""
        request = pb.GetConsistencyProofRequest(old_size=old_size, new_size=new_size)
        return consistency_from_proto(self._call(self._stub.GetConsistencyProof, lambda: request))

    def get_entries(self, start: int, end: int) -> list[SignedStatement]:
        """Log entries [start, end), fetched a page at a time: each is one leaf's bytes (its
        `body`) with the statement signature the log stores for it.

        Nothing here checks them: recompute a signed checkpoint's root over them and check
        each one's signature (`freemark.audit.monitor.verify_entries`) before trusting what
        they say.
        """
        if not 0 <= start <= end:
            raise InvalidInputError(f"invalid entry range [{start}, {end})")
        entries: list[SignedStatement] = []
        while start + len(entries) < end:
            request = pb.GetEntriesRequest(start=start + len(entries), end=end)
            page = self._call(self._stub.GetEntries, functools.partial(_same, request))
            if not page.entries:  # it signed a tree holding them: a log fault, not a bad input
                raise LogProofError(f"the server returned no entries from "
                                    f"{start + len(entries)} though its log holds {end}")
            entries.extend(entries_from_proto(page))
        return entries[: end - start]

    def public_key(self) -> bytes:
        """The TTP's Ed25519 public key (PEM). For audits, prefer a copy obtained out of band."""
        return bytes(self._call(self._stub.GetPublicKey, pb.GetPublicKeyRequest).pem)

    def log_key(self) -> tuple[bytes, str]:
        """The public key (PEM) and the log's origin, which checkpoints must name: pin both."""
        reply = self._call(self._stub.GetPublicKey, pb.GetPublicKeyRequest)
        return bytes(reply.pem), str(reply.origin)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyServiceClient({self._target!r})"
