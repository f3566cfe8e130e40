"""Call discipline: every call is counted, timed and logged with a request id, and no slow,
idle or disabled client can hold a slot for long.

One server interceptor wraps every method:
- a request id, set for the call's log lines and returned as `x-request-id` trailing metadata;
- RPC counts by method and status, latency histograms and in-flight gauges (`metrics`);
- KeyService calls are admitted against a cap over all principals (`--max-concurrent-rpcs`)
  and one per principal (`--max-calls-per-principal`); beyond either, RESOURCE_EXHAUSTED
  (RATE_LIMITED) at once, with a retry hint. Health and reflection are outside both caps
  and the thread pool keeps threads for them, so a full server still answers health checks;
  their own streams (Watch, reflection) have a small cap of their own, which needs no token
  and so is shared fairly by peer address (an IPv6 /64): at most EXEMPT_STREAMS_PER_PEER
  from one peer, and when all are held, a peer holding fewer than another takes the oldest
  stream of the peer holding the most (that stream is cancelled); each lives at most
  `--exempt-stream-lifetime` and is then cancelled (a health client re-watches), so a
  token-less client cannot hold every slot from one address, nor keep a slot from others;
- a streamed request is read through `WatchedRequests`: a stream that sends nothing for
  `--stream-idle-timeout`, arrives slower than `--min-upload-rate` after a grace period,
  or is still being read after `--max-stream-seconds`, is refused with DEADLINE_EXCEEDED
  (UPLOAD_STALLED) and its spool file (and its share of the spool quota) goes with it;
- a watchdog re-reads the principals that hold open calls every `--principal-recheck`
  seconds: a principal disabled meanwhile (`freemark-keyserver principal disable`, which
  writes the store from another process) has its open calls ended: a stream being read
  is refused UNAUTHENTICATED at once, anything else is cancelled a second later.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import unquote

import grpc

from freemark_keyserver import logs, metrics
from freemark_keyserver.auth import authenticate
from freemark_keyserver.config import EXEMPT_STREAMS, EXEMPT_STREAMS_PER_PEER, CallLimits
from freemark_keyserver.errors import ErrorCode, ServiceError, abort
from freemark_keyserver.store import Store

log = logging.getLogger("freemark_keyserver")
POLL_SECONDS = 0.25  # how often a waiting read looks at the clock and at its call's end
CANCEL_GRACE_SECONDS = 1.0  # an ended call that is not reading is cancelled after this
BUSY_RETRY_SECONDS = 1.0


@dataclass(eq=False)
class Call:
    """One admitted KeyService call."""

    method: str
    principal: str
    context: grpc.ServicerContext
    ended: ServiceError | None = None
    ended_at: float = 0.0
    closers: list[Callable[[], None]] = field(default_factory=list)

    def end(self, error: ServiceError) -> None:
        """Ask the call to stop: its next (or current) read raises `error`."""
        if self.ended is None:
            self.ended, self.ended_at = error, time.monotonic()


@dataclass(eq=False)
class ExemptStream:
    """One open health Watch or reflection stream (no principal: it needs no token)."""

    peer: str  # `peer_address` of the caller
    context: grpc.ServicerContext
    started: float


def peer_address(peer: str) -> str:
    """What one exempt-stream share is counted by: 'ipv4:10.0.0.7:5123' -> '10.0.0.7',
    'ipv6:[2001:db8::1]:5123' -> '2001:db8::/64' (one host's usual allocation), anything
    else (a Unix socket) as its kind alone."""
    kind, _, rest = unquote(peer).partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        if kind == "ipv4":
            return str(ipaddress.IPv4Address(host))
        if kind == "ipv6":
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        pass
    return kind


class CallRegistry:
    """The open calls by principal, their caps, and the watchdog for disabled principals."""

    def __init__(self, store: Store, limits: CallLimits) -> None:
        self.store = store
        self.limits = limits
        self._lock = threading.Lock()
        self._calls: dict[str, set[Call]] = {}
        self._total = 0
        self._exempt: list[ExemptStream] = []  # oldest first
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="freemark-call-watchdog",
                                          daemon=True)

    def start(self) -> None:
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=5)

    def open_calls(self, principal: str) -> int:
        with self._lock:
            return len(self._calls.get(principal, ()))

    def admit(self, method: str, context: grpc.ServicerContext) -> Call:
        """Count the call against both caps, or refuse it before any work is done."""
        with self._lock:
            if self._total >= self.limits.max_calls:
                metrics.RATE_LIMITED_TOTAL.labels("server_calls").inc()
                raise ServiceError(ErrorCode.RATE_LIMITED, f"the server is serving its limit of "
                                   f"{self.limits.max_calls} calls; retry in 1 s",
                                   retry_after=BUSY_RETRY_SECONDS)
            self._total += 1
        try:
            principal = authenticate(self.store, context)
        except BaseException:
            with self._lock:
                self._total -= 1
            raise
        with self._lock:
            open_calls = self._calls.setdefault(principal.name, set())
            if len(open_calls) >= self.limits.max_calls_per_principal:
                self._total -= 1
                metrics.RATE_LIMITED_TOTAL.labels("principal_calls").inc()
                raise ServiceError(
                    ErrorCode.RATE_LIMITED, f"you already have {len(open_calls)} calls open, the "
                    f"limit per principal; retry when one has finished", retry_after=BUSY_RETRY_SECONDS)
            call = Call(method, principal.name, context)
            open_calls.add(call)
            return call

    def release(self, call: Call) -> None:
        for close in call.closers:
            close()
        with self._lock:
            self._total -= 1
            open_calls = self._calls.get(call.principal, set())
            open_calls.discard(call)
            if not open_calls:
                self._calls.pop(call.principal, None)

    def exempt_streams(self, peer: str | None = None) -> int:
        """Health/reflection streams open now (from `peer_address` `peer`, or all)."""
        with self._lock:
            return sum(peer is None or s.peer == peer for s in self._exempt)

    def admit_exempt_stream(self, context: grpc.ServicerContext,
                            clock: Callable[[], float] = time.monotonic) -> ExemptStream | None:
        """A slot for a health Watch or reflection stream, or None (refuse it).

        At most EXEMPT_STREAMS_PER_PEER per peer address. When all EXEMPT_STREAMS are held,
        a peer holding fewer than the greediest peer takes that peer's oldest stream, which
        is cancelled: however many addresses a flood comes from, a peer that holds no slot
        is served.
        """
        stream = ExemptStream(peer_address(context.peer()), context, clock())
        with self._lock:
            mine = sum(s.peer == stream.peer for s in self._exempt)
            if mine >= EXEMPT_STREAMS_PER_PEER:
                return None
            victim = None
            if len(self._exempt) >= EXEMPT_STREAMS:
                counts = Counter(s.peer for s in self._exempt)
                greediest = max(counts.values())
                if greediest <= mine:
                    return None
                victim = next(s for s in self._exempt if counts[s.peer] == greediest)
                self._exempt.remove(victim)
            self._exempt.append(stream)
        if victim is not None:
            self._end_exempt(victim, "evicted")
        return stream

    def release_exempt_stream(self, stream: ExemptStream) -> None:
        with self._lock:
            if stream in self._exempt:
                self._exempt.remove(stream)

    def _end_exempt(self, stream: ExemptStream, reason: str) -> None:
        metrics.STREAMS_CLOSED_TOTAL.labels(reason).inc()
        log.info("ending a health/reflection stream of %s (%s)", stream.peer, reason,
                 extra={"peer": stream.peer, "reason": reason})
        stream.context.cancel()

    def end_old_exempt_streams(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Cancel the health/reflection streams older than `--exempt-stream-lifetime`."""
        now = clock()
        with self._lock:
            old = [s for s in self._exempt if now - s.started >= self.limits.exempt_lifetime]
            for stream in old:
                self._exempt.remove(stream)
        for stream in old:
            self._end_exempt(stream, "lifetime")

    def _watch(self) -> None:
        while not self._stop.wait(self.limits.principal_recheck):
            try:
                self.end_old_exempt_streams()
                self._end_disabled()
            except Exception:  # the watchdog must outlive a store hiccup
                log.exception("the call watchdog could not re-read the principals")

    def _end_disabled(self) -> None:
        with self._lock:
            snapshot = {name: list(calls) for name, calls in self._calls.items()}
        now = time.monotonic()
        for name, calls in snapshot.items():
            principal = self.store.principal_by_name(name)
            if principal is None or principal.disabled:
                for call in calls:
                    if call.ended is None:
                        metrics.STREAMS_CLOSED_TOTAL.labels("disabled").inc()
                        log.warning("ending %s of disabled principal %s", call.method, name,
                                    extra={"principal": name, "reason": "disabled"})
                    call.end(ServiceError(ErrorCode.UNAUTHENTICATED, f"principal {name!r} was "
                                          "disabled; its open calls are ended"))
            for call in calls:
                if call.ended is not None and now - call.ended_at >= CANCEL_GRACE_SECONDS:
                    call.context.cancel()


class WatchedRequests:
    """A call's request stream, read with an idle timeout, a minimum rate and an end signal.

    A reader thread pulls messages from gRPC into a one-message queue (so memory stays at a
    message or two per stream and the client still feels back-pressure); the handler's
    thread takes them with a timeout, which is what lets a silent stream be refused with a
    status the client can read instead of hanging until the client lets go.
    """

    _END = object()

    def __init__(self, requests: Iterator[Any], call: Call, limits: CallLimits) -> None:
        self._call = call
        self._limits = limits
        self._queue: queue.Queue[tuple[object, Any]] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._started = time.monotonic()
        self._received = 0
        self._done = False
        call.closers.append(self._closed.set)
        threading.Thread(target=self._pump, args=(requests,), name="freemark-stream-reader",
                         daemon=True).start()

    def _put(self, item: tuple[object, Any]) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def _pump(self, requests: Iterator[Any]) -> None:
        try:
            for message in requests:
                self._put((None, message))
                if self._closed.is_set():
                    return
            self._put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the handler's thread
            self._put((exc, None))

    def __iter__(self) -> WatchedRequests:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        idle_since = time.monotonic()
        while True:
            if self._call.ended is not None:
                raise self._call.ended
            try:
                kind, message = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                now = time.monotonic()
                if now - idle_since >= self._limits.idle_timeout:
                    raise self._stalled("idle", f"the stream sent nothing for "
                                        f"{self._limits.idle_timeout:g} s (the server's idle "
                                        "timeout); the partial upload was deleted, re-send it")
                self._check_rate(now)
                continue
            if kind is self._END:
                self._done = True
                raise StopIteration
            if isinstance(kind, BaseException):
                self._done = True
                raise kind
            self._received += message.ByteSize()
            self._check_rate(time.monotonic())
            return message

    def _check_rate(self, now: float) -> None:
        if now - self._started >= self._limits.max_stream_seconds:
            raise self._stalled("too_long", f"the stream lasted longer than the server's maximum "
                                f"of {self._limits.max_stream_seconds:g} s; the partial upload "
                                "was deleted, re-send it over a faster link")
        late = now - self._started - self._limits.rate_grace
        if late > 0 and self._received < self._limits.min_upload_rate * late:
            raise self._stalled("slow", f"the upload arrived slower than the server's minimum of "
                                f"{self._limits.min_upload_rate} bytes/s; the partial upload was "
                                "deleted, re-send it over a faster link")

    def _stalled(self, reason: str, message: str) -> ServiceError:
        metrics.STREAMS_CLOSED_TOTAL.labels(reason).inc()
        log.info("closing a stalled %s stream (%s)", self._call.method, reason,
                 extra={"reason": reason, "principal": self._call.principal})
        self._done = True
        return ServiceError(ErrorCode.UPLOAD_STALLED, message)


def _short(method: str) -> str:
    """'/freemark.v1.KeyService/Verify' -> 'KeyService/Verify' (the metrics label)."""
    service, _, name = method.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


class CallInterceptor(grpc.ServerInterceptor):
    """Request ids, metrics, logs and the call caps for every method of the server."""

    def __init__(self, registry: CallRegistry, guarded_service: str) -> None:
        self.registry = registry
        self.prefix = f"/{guarded_service}/"

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method  # type: ignore[attr-defined]
        guarded = method.startswith(self.prefix)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, guarded, handler.stream_stream),
                handler.request_deserializer, handler.response_serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, guarded, True, handler.stream_unary),
                handler.request_deserializer, handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, guarded, handler.unary_stream),
                handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, guarded, False, handler.unary_unary),
            handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: str, guarded: bool, request_streaming: bool,
               behaviour: Callable[[Any, grpc.ServicerContext], Any]
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            with _Observed(method, context, guarded) as observed:
                if guarded:
                    observed.admit(self.registry)
                    if request_streaming and observed.call is not None:
                        request = WatchedRequests(request, observed.call, self.registry.limits)
                return behaviour(request, context)
        return run

    def _streaming(self, method: str, guarded: bool,
                   behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                   ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _Observed(method, context, guarded) as observed:
                if guarded:
                    observed.admit(self.registry)
                else:
                    exempt = self.registry.admit_exempt_stream(context)
                    if exempt is None:
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"at most {EXEMPT_STREAMS_PER_PEER} health/reflection "
                                      f"streams per peer, {EXEMPT_STREAMS} in all, at once")
                        return  # abort raised
                    observed.on_exit(functools.partial(self.registry.release_exempt_stream,
                                                       exempt))
                yield from behaviour(request, context)
        return run


class _Observed:
    """The bookkeeping around one call: request id, metrics, the log line, its slot."""

    def __init__(self, method: str, context: grpc.ServicerContext, guarded: bool) -> None:
        self.method = _short(method)
        self.context = context
        self.guarded = guarded
        self.call: Call | None = None
        self._exits: list[Callable[[], None]] = []
        self.request_id = logs.new_request_id()

    def admit(self, registry: CallRegistry) -> None:
        try:
            self.call = registry.admit(self.method, self.context)
        except ServiceError as exc:
            abort(self.context, exc.code, str(exc), exc.retry_after)
        call = self.call
        assert call is not None  # admitted, or aborted above
        self.on_exit(lambda: registry.release(call))

    def on_exit(self, action: Callable[[], None]) -> None:
        self._exits.append(action)

    def __enter__(self) -> Self:
        self._token = logs.REQUEST_ID.set(self.request_id)
        self.context.set_trailing_metadata(((logs.REQUEST_ID_KEY, self.request_id),))
        self._started = time.monotonic()
        metrics.RPC_IN_FLIGHT.labels(self.method).inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        for action in self._exits:
            action()
        seconds = time.monotonic() - self._started
        code = self.context.code()  # type: ignore[attr-defined]  # set by abort / set_code
        if code is None:  # a closed response stream (GeneratorExit) is a client's cancel
            code = grpc.StatusCode.OK if kind is None else grpc.StatusCode.CANCELLED \
                if kind is GeneratorExit else grpc.StatusCode.UNKNOWN
        metrics.RPC_IN_FLIGHT.labels(self.method).dec()
        metrics.RPC_TOTAL.labels(self.method, code.name).inc()
        metrics.RPC_SECONDS.labels(self.method).observe(seconds)
        level = logging.INFO if self.guarded else logging.DEBUG
        log.log(level, "%s %s", self.method, code.name, extra={
            "method": self.method, "code": code.name, "duration_ms": round(seconds * 1000, 1),
            "principal": self.call.principal if self.call else None,
            "peer": self.context.peer()})
        logs.REQUEST_ID.reset(self._token)
