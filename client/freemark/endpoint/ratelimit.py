"""A rate limit on the queries sent to each endpoint, kept across verifications.

The key server's outbound queries must not make it a way to flood somebody's server, nor let
one requester probe one endpoint without end. A token bucket per endpoint origin
(scheme://host:port) holding `EndpointPolicy.rate_inputs` inputs, refilled evenly over
`rate_window_s`. A verification takes everything it will send before the first request, so a
refusal never leaves one half-sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from freemark.endpoint.policy import EndpointPolicy
from freemark.errors import EndpointBudgetError

__all__ = ["EndpointRateLimiter"]

_MAX_TRACKED = 4096  # buckets kept before full ones are forgotten (a full bucket is the default)


class EndpointRateLimiter:
    """Thread-safe token buckets of inputs, one per endpoint origin."""

    def __init__(self, policy: EndpointPolicy, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(policy.rate_inputs)
        self._per_s = policy.rate_inputs / policy.rate_window_s
        self._now = monotonic
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # origin -> (tokens, at)

    def take(self, origin: str, inputs: int) -> None:
        """Take `inputs` tokens from `origin`'s bucket, or raise `EndpointBudgetError` with the
        wait after which they will be there (None if they never fit)."""
        with self._lock:
            now = self._now()
            tokens, at = self._buckets.get(origin, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - at) * self._per_s)
            if inputs > self._capacity:
                raise EndpointBudgetError(
                    f"{origin}: {inputs} queries exceed the endpoint rate limit's whole "
                    f"allowance ({int(self._capacity)}); this can never be sent")
            if inputs > tokens:
                wait = (inputs - tokens) / self._per_s
                raise EndpointBudgetError(
                    f"{origin}: the rate limit on queries to this endpoint is spent; retry in "
                    f"{wait:.0f} s", retry_after=wait)
            self._buckets[origin] = (tokens - inputs, now)
            if len(self._buckets) > _MAX_TRACKED:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for origin, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self._per_s >= self._capacity:
                del self._buckets[origin]
