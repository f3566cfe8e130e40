"""Verify's token buckets on a scripted clock: the burst, the refill, the wait they name."""

from __future__ import annotations

import pytest

from freemark_keyserver.config import Rate
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.rpc.ratelimit import Buckets, VerifyLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("text", "rate"), [("10/min", Rate(10, 60.0)), ("20/hour", Rate(20, 3600.0)),
                                            ("3/s", Rate(3, 1.0)), (" 5 / day ", Rate(5, 86400.0)),
                                            ("off", Rate(0, 1.0)), ("0", Rate(0, 1.0))])
def test_rates_parse(text: str, rate: Rate) -> None:
    assert Rate.parse(text) == rate


@pytest.mark.parametrize("text", ["10", "10/week", "-1/min", "0/min", "ten/min", ""])
def test_bad_rates_name_the_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="N/UNIT"):
        Rate.parse(text)


def test_a_bucket_allows_its_burst_then_names_the_wait_and_refills() -> None:
    clock = Clock()
    buckets = Buckets(Rate(3, 60.0), clock)  # one token every 20 s
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(20.0)
    assert buckets.take("b") == 0.0  # keys are independent
    clock.now += 10
    assert buckets.take("a") == pytest.approx(10.0)
    clock.now += 10
    assert buckets.take("a") == 0.0
    clock.now += 3600  # refills only up to the burst
    assert [buckets.take("a") for _ in range(4)][-1] == pytest.approx(20.0)


def test_off_never_refuses() -> None:
    buckets = Buckets(Rate.parse("off"), Clock())
    assert all(buckets.take("a") == 0.0 for _ in range(1000))


def test_verify_limits_refuse_with_rate_limited_and_a_retry_hint() -> None:
    clock = Clock()
    limits = VerifyLimits(Rate(1, 60.0), Rate(2, 3600.0), clock)
    limits.check_principal("arbiter")
    with pytest.raises(ServiceError) as caught:
        limits.check_principal("arbiter")
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after == pytest.approx(60.0)
    assert "limited to 1/min; retry in 60 s" in str(caught.value)
    limits.check_registration("reg_x")
    limits.check_registration("reg_x")
    with pytest.raises(ServiceError, match="all callers together") as caught:
        limits.check_registration("reg_x")
    assert caught.value.retry_after == pytest.approx(1800.0)
