"""Token buckets for Verify (issue 11's oracle limit) and Register (issue 18).

Every verdict is an oracle answer: a thief with Verify access can search for the smallest
function-preserving change that flips it in about ten queries. A bucket holds `burst`
tokens and refills at `burst` per `period`. A Verify takes one from its caller's bucket
before anything is read, and one from its registration's bucket only once its upload has
completed (size and SHA-256 checked): a header-only or abandoned call asks nothing of the
registration, so it costs its caller's own bucket and never anyone else's. A registration
has two buckets: its owner's, and everyone else's (arbiters and admins together), so no
caller but the owner can spend the owner's budget. A Register takes one from its caller's
bucket before anything is read (every Register runs the prior-claim check on other owners'
secret triggers, so its outcome and its latency are oracle answers too). An empty bucket is
refused with RESOURCE_EXHAUSTED (RATE_LIMITED) naming the wait, which also goes out as
RetryInfo; a registration's is looked at before the upload too (charging nothing), so a
call that would be refused is refused before its bytes are sent.

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
from freemark_keyserver.store import Registration

MAX_BUCKETS = 100_000  # full (idle) buckets are forgotten past this many keys


class Buckets:
    """One token bucket per key, all with the same rate; thread-safe."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def _per_second(self) -> float:
        return self.rate.burst / self.rate.period

    def _refilled(self, key: str) -> tuple[float, float]:
        """`key`'s tokens now, refilled since it was last charged, and now (hold the lock)."""
        now = self._clock()
        tokens, at = self._state.get(key, (float(self.rate.burst), now))
        return min(float(self.rate.burst), tokens + (now - at) * self._per_second), now

    def wait(self, key: str) -> float:
        """The seconds until `key` has a token (0.0: one is there now); takes nothing."""
        if not self.rate.burst:
            return 0.0
        with self._lock:
            tokens, _ = self._refilled(key)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._per_second

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when taken, else the seconds until one is free."""
        if not self.rate.burst:
            return 0.0
        with self._lock:
            tokens, now = self._refilled(key)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                self._forget_full(now, self._per_second)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self._per_second

    def _forget_full(self, now: float, per_second: float) -> None:
        """Bound memory: past MAX_BUCKETS keys, drop the buckets that have refilled (a full
        bucket and a missing one behave the same)."""
        if len(self._state) <= MAX_BUCKETS:
            return
        self._state = {k: (t, a) for k, (t, a) in self._state.items()
                       if t + (now - a) * per_second < self.rate.burst}


class VerifyLimits:
    """Verify's buckets: the caller's, then the registration's (its owner's, or everyone
    else's)."""

    def __init__(self, per_principal: Rate, per_registration: Rate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.principals = Buckets(per_principal, clock)
        self.registrations = Buckets(per_registration, clock)  # callers other than the owner
        self.owners = Buckets(per_registration, clock)  # the owner's own, at the same rate

    def check_principal(self, principal: str) -> None:
        """RATE_LIMITED when this caller's Verify bucket is empty."""
        wait = self.principals.take(principal)
        if wait:
            metrics.RATE_LIMITED_TOTAL.labels("verify_principal").inc()
            raise ServiceError(ErrorCode.RATE_LIMITED, f"your Verify calls are limited to "
                               f"{self.principals.rate}; retry in {_seconds(wait)}", retry_after=wait)

    def check_registration(self, registration_id: str, *, owner: bool, charge: bool) -> None:
        """RATE_LIMITED when this registration's bucket for the caller is empty: the owner's
        own, or the one everyone else shares. `charge` takes the token (a completed upload);
        without it the bucket is only looked at."""
        buckets = self.owners if owner else self.registrations
        wait = buckets.take(registration_id) if charge else buckets.wait(registration_id)
        if wait:
            metrics.RATE_LIMITED_TOTAL.labels("verify_registration").inc()
            whose = "by its owner" if owner else "by callers other than its owner, all together"
            raise ServiceError(ErrorCode.RATE_LIMITED, f"this registration may be verified "
                               f"{buckets.rate} {whose}; retry in {_seconds(wait)}",
                               retry_after=wait)

    def admission(self, principal: str) -> RegistrationAdmission:
        """The registration buckets as one caller's Verify handler charges them."""
        return RegistrationAdmission(self, principal)


class RegistrationAdmission:
    """One caller's view of the registration buckets (`handlers.context.Admission`)."""

    def __init__(self, limits: VerifyLimits, principal: str) -> None:
        self._limits, self._principal = limits, principal

    def check(self, record: Registration) -> None:
        """Refuse now, charging nothing, when the bucket is already empty."""
        self._limits.check_registration(record.registration_id,
                                        owner=record.owner == self._principal, charge=False)

    def charge(self, record: Registration) -> None:
        """Take the token: the caller's upload has completed."""
        self._limits.check_registration(record.registration_id,
                                        owner=record.owner == self._principal, charge=True)


class RegisterLimits:
    """Register's bucket: one per caller."""

    def __init__(self, per_principal: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.principals = Buckets(per_principal, clock)

    def check_principal(self, principal: str) -> None:
        """RATE_LIMITED when this caller's Register bucket is empty."""
        wait = self.principals.take(principal)
        if wait:
            metrics.RATE_LIMITED_TOTAL.labels("register_principal").inc()
            raise ServiceError(ErrorCode.RATE_LIMITED, f"your Register calls are limited to "
                               f"{self.principals.rate}; retry in {_seconds(wait)}",
                               retry_after=wait)


def _seconds(wait: float) -> str:
    return f"{max(1, math.ceil(wait))} s"
