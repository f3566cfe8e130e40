"""Building and running the gRPC server: one factory, every option commented, a fixed stop order.

Every call goes through `calls.CallInterceptor` (request id, metrics, log line, the caps,
idle and slow streams); the thread pool is sized by the caps plus a reserve, so it is the
caps that refuse a flood and health checks always find a thread. The upload spool is
emptied before the port opens.

Health (`grpc.health.v1.Health`, Check and Watch) names "" and the KeyService,
`freemark.sandbox` (NOT_SERVING while the fork server is down and being relaunched), and one
service per sandbox isolation layer (`isolation_health`): an operator's probe sees what the
sandbox stands on, not only that the server is up.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from freemark.rpc import recycle_chunk_memory
from freemark.v1 import keyservice_pb2, keyservice_pb2_grpc
from freemark_keyserver import metrics
from freemark_keyserver.config import ServerConfig, load_keyring, load_signing_key
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.rpc.calls import CallInterceptor, CallRegistry
from freemark_keyserver.rpc.service import KeyServiceServicer
from freemark_keyserver.sandbox.runner import LAYERS, Isolation
from freemark_keyserver.store import open_store

log = logging.getLogger("freemark_keyserver")
SERVICE_NAME = keyservice_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
MESSAGE_SLACK = 1024 * 1024
BACKSTOP_FACTOR = 4  # grpc's own cap on calls: far above ours, only against a flood of calls
ISOLATION_HEALTH_PREFIX = "freemark.sandbox.isolation."
SANDBOX_HEALTH = "freemark.sandbox"  # NOT_SERVING while the fork server is down


def isolation_health(isolation: Isolation
                     ) -> dict[str, health_pb2.HealthCheckResponse.ServingStatus]:
    """One health service per isolation layer, `freemark.sandbox.isolation.<layer>`.

    SERVING when the start-up probe found the layer on, NOT_SERVING when it is unavailable.
    The health protocol has no text field, so why a layer is off stays in `serve`'s output
    and the log; the names come from the sandbox's `LAYERS`, so a new layer gets one.
    """
    return {ISOLATION_HEALTH_PREFIX + layer:
            health_pb2.HealthCheckResponse.SERVING if isolation.on(layer)
            else health_pb2.HealthCheckResponse.NOT_SERVING
            for layer in LAYERS}


@dataclass
class RunningServer:
    """A started server and what must be closed with it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    ctx: Context
    calls: CallRegistry
    metrics_http: WSGIServer | None = None

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the metrics page (None without `--metrics-listen`)."""
        return self.metrics_http.server_port if self.metrics_http else None

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, let in-flight calls finish, then close the store."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.ctx.config.grace_seconds if grace is None else grace).wait()
        self.calls.stop()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        self.ctx.close()


def create_server(config: ServerConfig) -> RunningServer:
    """Start a key server for `config`; returns it with its bound port (listen on :0 for tests)."""
    config.check_listen()
    # Uploads arrive as 1 MiB messages, copied on receipt: recycled heap buffers, not a
    # fresh mapping per copy (`recycle_chunk_memory`; issue 20).
    recycle_chunk_memory()
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The sandbox's fork server first, before any key or the database is opened: it is a
    # fresh interpreter with a clean environment, so it could not inherit them anyway, and
    # a server that cannot isolate untrusted models should not start at all.
    pool = config.start_sandbox()
    log.info("sandbox: %d workers, queue %d; isolation: %s", pool.workers, pool.queue,
             pool.isolation.summary())
    try:
        ctx = Context(config=config, store=open_store(config.database),
                      keyring=load_keyring(config), signer=load_signing_key(config), pool=pool)
    except BaseException:
        pool.close()
        raise
    # The claim index is rebuilt from the store before the first call, not by it.
    started = time.monotonic()
    ctx.claims.refresh(ctx.store)
    log.info("claim index: %d registrations, %.1f MiB, rebuilt in %.2f s", len(ctx.claims),
             ctx.claims.memory_bytes() / 2**20, time.monotonic() - started)
    servicer = KeyServiceServicer(ctx)
    # Plaintext never outlives a crash: uploads and decrypted hosts a dead process left.
    servicer.spool.clear()
    limits = config.call_limits
    calls = CallRegistry(ctx.store, limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.pool_threads),
        interceptors=[CallInterceptor(calls, SERVICE_NAME)],
        # Our caps (in the interceptor) refuse with a reason and a retry hint, and spare
        # health checks; grpc's own stays far above them, against a flood of calls only.
        maximum_concurrent_rpcs=BACKSTOP_FACTOR * limits.pool_threads,
        options=[
            # Register's header carries the key bundle in one message; chunks are 1 MiB. No
            # message may be larger (a chunk as big would sit whole in the server's memory).
            ("grpc.max_receive_message_length", config.max_bundle_bytes + MESSAGE_SLACK),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            # Let clients keep connections alive through idle periods without being kicked.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    keyservice_pb2_grpc.add_KeyServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection lets grpcurl and friends list the API; it exposes no data.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=config.client_ca.read_bytes() if config.client_ca else None,
            require_client_auth=config.client_ca is not None,
        )
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        ctx.close()
        raise OSError(f"cannot listen on {config.listen}")
    metrics.track_log_size(ctx.store.tree_size)
    metrics_http = metrics.serve_http(config.metrics_listen) if config.metrics_listen else None
    server.start()
    calls.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name, status in {"": serving, SERVICE_NAME: serving, SANDBOX_HEALTH: serving,
                         **isolation_health(pool.isolation)}.items():
        health_servicer.set(name, status)
    pool.on_state = lambda alive: health_servicer.set(
        SANDBOX_HEALTH, serving if alive else health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("freemark key server listening on port %d (key id %s)", port, ctx.signer.key_id)
    if metrics_http is not None:
        log.info("metrics on http://%s:%d/metrics", metrics_http.server_address[0],
                 metrics_http.server_port)
    return RunningServer(server, port, health_servicer, ctx, calls, metrics_http)


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    running = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pool = running.ctx.pool
    assert pool is not None
    print(f"freemark-keyserver sandbox: {pool.workers} workers, queue {pool.queue}; isolation: "
          f"{pool.isolation.summary()}", flush=True)
    print(f"freemark-keyserver listening on {config.listen.rsplit(':', 1)[0]}:{running.port}",
          flush=True)
    stop.wait()
    log.info("stopping: health NOT_SERVING, finishing in-flight calls")
    running.stop()
