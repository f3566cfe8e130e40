"""The health names of the sandbox's isolation layers (`server.isolation_health`).

The integration test (`tests/integration/test_sandbox_service.py`) reads them from a real
server, where every layer this machine allows is on; this covers what an operator sees on a
machine that lacks some: NOT_SERVING, never a missing name.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from freemark_keyserver.sandbox.runner import LAYERS, Isolation
from freemark_keyserver.server import isolation_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_layer_that_is_unavailable_or_unreported_is_not_serving() -> None:
    isolation = Isolation({"network": "unavailable (unshare(CLONE_NEWNET): Operation not "
                                      "permitted)", "user": "unavailable (not root)",
                           "private": "on", "limits": "on"})  # seccomp: not reported at all
    assert isolation_health(isolation) == {
        "freemark.sandbox.isolation.network": NOT_SERVING,
        "freemark.sandbox.isolation.user": NOT_SERVING,
        "freemark.sandbox.isolation.private": SERVING,
        "freemark.sandbox.isolation.limits": SERVING,
        "freemark.sandbox.isolation.seccomp": NOT_SERVING,
    }


def test_every_layer_has_exactly_one_name() -> None:
    names = isolation_health(Isolation({layer: "on" for layer in LAYERS}))
    assert sorted(names) == sorted(f"freemark.sandbox.isolation.{layer}" for layer in LAYERS)
    assert set(names.values()) == {SERVING}
