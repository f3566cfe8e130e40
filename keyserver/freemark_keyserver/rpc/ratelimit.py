"""Token buckets for Verify: per principal and per registration (issue 11's oracle limit).

Every verdict is an oracle answer: a thief with Verify access can search for the smallest
function-preserving change that flips it in about ten queries. A bucket holds `burst`
tokens and refills at `burst` per `period`; a Verify takes one from its caller's bucket and
one from its registration's bucket before anything is read, or is refused with
RESOURCE_EXHAUSTED (RATE_LIMITED) naming the wait, which also goes out as RetryInfo.

A rate is written "N/UNIT" (UNIT one of s, min, hour, day); "0" or "off" turns it off.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from freemark_keyserver import metrics
from freemark_keyserver.config import Rate
from freemark_keyserver.errors import ErrorCode, ServiceError

MAX_BUCKETS = 100_000  # full (idle) buckets are forgotten past this many keys




class Buckets:
    """One token bucket per key, all with the same rate; thread-safe."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when taken, else the seconds until one is free."""
        if not self.rate.burst:
            return 0.0
        per_second = self.rate.burst / self.rate.period
        with self._lock:
            now = self._clock()
            tokens, at = self._state.get(key, (float(self.rate.burst), now))
            tokens = min(float(self.rate.burst), tokens + (now - at) * per_second)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                self._forget_full(now, per_second)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / per_second

    def _forget_full(self, now: float, per_second: float) -> None:
        """Bound memory: past MAX_BUCKETS keys, drop the buckets that have refilled (a full
        bucket and a missing one behave the same)."""
        if len(self._state) <= MAX_BUCKETS:
            return
        self._state = {k: (t, a) for k, (t, a) in self._state.items()
                       if t + (now - a) * per_second < self.rate.burst}


class VerifyLimits:
    """Verify's two buckets: the caller's, then the registration's."""

    def __init__(self, per_principal: Rate, per_registration: Rate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.principals = Buckets(per_principal, clock)
        self.registrations = Buckets(per_registration, clock)

    def check_principal(self, principal: str) -> None:
        """RATE_LIMITED when this caller's Verify bucket is empty."""
        wait = self.principals.take(principal)
        if wait:
            metrics.RATE_LIMITED_TOTAL.labels("verify_principal").inc()
            raise ServiceError(ErrorCode.RATE_LIMITED, f"your Verify calls are limited to "
                               f"{self.principals.rate}; retry in {_seconds(wait)}", retry_after=wait)

    def check_registration(self, registration_id: str) -> None:
        """RATE_LIMITED when this registration's Verify bucket is empty (all callers)."""
        wait = self.registrations.take(registration_id)
        if wait:
            metrics.RATE_LIMITED_TOTAL.labels("verify_registration").inc()
            raise ServiceError(ErrorCode.RATE_LIMITED, f"this registration may be verified "
                               f"{self.registrations.rate} (all callers together); retry in "
                               f"{_seconds(wait)}", retry_after=wait)


def _seconds(wait: float) -> str:
    return f"{max(1, math.ceil(wait))} s"
