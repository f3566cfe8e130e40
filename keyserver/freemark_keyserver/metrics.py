"""The key server's Prometheus metrics: every metric object is defined here, once.

Modules update them where the event happens (the RPC interceptor in `server`, the sandbox
pool in `sandbox`, uploads in `uploads`); `serve --metrics-listen HOST:PORT` exposes them
over HTTP. They live in a registry of their own (not prometheus_client's global one) so a
library that imports this package cannot add series to the TTP's page, and so the page
carries exactly what `docs/operations.md` lists. Labels are bounded sets (method names,
status codes, kill reasons): nothing a client sends becomes a label, so no caller can
grow the page without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, CPU seconds, open fds
PlatformCollector(registry=REGISTRY)

# Latency buckets from a health check (milliseconds) to a large model's Register (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)

RPC_TOTAL = Counter(
    "freemark_rpc_handled_total", "Finished RPCs by method and gRPC status code.",
    ["method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram(
    "freemark_rpc_duration_seconds", "RPC wall time from the first byte to the status, by method.",
    ["method"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
RPC_IN_FLIGHT = Gauge(
    "freemark_rpc_in_flight", "RPCs being served now, by method.", ["method"], registry=REGISTRY)
RATE_LIMITED_TOTAL = Counter(
    "freemark_rate_limited_total", "Calls refused by a limit before any work, by which limit "
    "(principal_calls, verify_principal, verify_registration, register_principal, "
    "spool_quota, spool_share).",
    ["limit"], registry=REGISTRY)
STREAMS_CLOSED_TOTAL = Counter(
    "freemark_streams_closed_total", "Calls the server ended itself, by why (idle, slow, "
    "too_long, disabled; health/reflection: lifetime, evicted).", ["reason"], registry=REGISTRY)

SPOOL_BYTES = Gauge(
    "freemark_spool_bytes", "Bytes reserved in the upload spool by open uploads.",
    registry=REGISTRY)
LOG_SIZE = Gauge(
    "freemark_log_entries", "Entries in the transparency log (its tree size).", registry=REGISTRY)

# The sandbox pool updates these.
SANDBOX_QUEUE_DEPTH = Gauge(
    "freemark_sandbox_queue_depth", "Untrusted-model runs waiting for a sandbox worker.",
    registry=REGISTRY)
SANDBOX_RUNNING = Gauge(
    "freemark_sandbox_running", "Sandbox children running an untrusted model now.",
    registry=REGISTRY)
SANDBOX_KILLS_TOTAL = Counter(
    "freemark_sandbox_kills_total", "Sandbox children killed, by reason (deadline, cpu, memory, "
    "cancelled, crash, output).", ["reason"], registry=REGISTRY)
SANDBOX_RESTARTS_TOTAL = Counter(
    "freemark_sandbox_restarts_total", "Times the sandbox fork server died and was relaunched.",
    registry=REGISTRY)
SANDBOX_RUN_SECONDS = Histogram(
    "freemark_sandbox_run_seconds", "Wall time of one sandboxed run, from fork to result.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY)


def track_log_size(size: Callable[[], int]) -> None:
    """Read the log size from `size()` at every scrape (a failing read reports -1)."""
    def read() -> float:
        try:
            return float(size())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is closing
            return -1.0
    LOG_SIZE.set_function(read)


def serve_http(listen: str) -> WSGIServer:
    """Serve the metrics page on `listen` ("HOST:PORT"; port 0 picks one) in a daemon thread.

    The page is plain text with no secrets, but it tells an outsider how busy the TTP is:
    bind it to loopback or an operations network, not to the clients' address.
    """
    host, _, port = listen.rpartition(":")
    httpd, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                       registry=REGISTRY)
    return httpd
