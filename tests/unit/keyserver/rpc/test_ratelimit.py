"""Verify's and Register's token buckets on a scripted clock: the burst, the refill, the wait
they name, and whose budget each call spends."""

from __future__ import annotations

import pytest

from freemark_keyserver.config import Rate
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.rpc.ratelimit import Buckets, RegisterLimits, VerifyLimits
from freemark_keyserver.store import Registration


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
    limits.check_registration("reg_x", owner=False, charge=True)
    limits.check_registration("reg_x", owner=False, charge=True)
    with pytest.raises(ServiceError, match="other than its owner, all together") as caught:
        limits.check_registration("reg_x", owner=False, charge=True)
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after == pytest.approx(1800.0)


def test_looking_at_a_bucket_takes_nothing() -> None:
    clock = Clock()
    buckets = Buckets(Rate(2, 60.0), clock)
    assert [buckets.wait("a") for _ in range(100)] == [0.0] * 100
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.wait("a") == pytest.approx(30.0)
    assert buckets.wait("a") == pytest.approx(30.0)  # still nothing taken
    clock.now += 30
    assert buckets.wait("a") == 0.0


def _registration(owner: str) -> Registration:
    return Registration(registration_id="reg_x", owner=owner, created_at=0, host_fingerprint=b"",
                        architecture_digest=b"", layer="act", units=8, n_bits=8, commitment=b"",
                        key_version=1, envelope=b"", host_envelope=b"", log_index=0)


def test_other_callers_never_spend_the_owners_registration_budget() -> None:
    """Issue 18 5(a): arbiters and admins drained the registration's one bucket, and the owner
    was RATE_LIMITED for hours. Now the owner has a bucket of its own at the same rate."""
    limits = VerifyLimits(Rate(100, 60.0), Rate(3, 3600.0), Clock())
    record = _registration("owner_a")
    for caller in ("arbiter_1", "arbiter_2", "admin"):
        limits.admission(caller).charge(record)
    for caller in ("arbiter_1", "admin"):
        with pytest.raises(ServiceError, match="other than its owner"):
            limits.admission(caller).check(record)
        with pytest.raises(ServiceError, match="other than its owner"):
            limits.admission(caller).charge(record)
    owner = limits.admission("owner_a")
    for _ in range(3):
        owner.check(record)
        owner.charge(record)
    with pytest.raises(ServiceError, match="by its owner") as caught:
        owner.check(record)
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after == pytest.approx(1200.0)


def test_checking_before_the_upload_charges_nothing() -> None:
    """A Verify looks at the registration's bucket before its upload and charges it after: any
    number of header-only calls leave the bucket full."""
    limits = VerifyLimits(Rate(100, 60.0), Rate(1, 3600.0), Clock())
    record = _registration("owner_a")
    for _ in range(50):
        limits.admission("arbiter_1").check(record)
    limits.admission("arbiter_1").charge(record)
    with pytest.raises(ServiceError):
        limits.admission("arbiter_2").check(record)


def test_register_limits_are_per_caller() -> None:
    clock = Clock()
    limits = RegisterLimits(Rate(2, 3600.0), clock)
    limits.check_principal("owner_a")
    limits.check_principal("owner_a")
    with pytest.raises(ServiceError, match="Register calls are limited to 2/hour") as caught:
        limits.check_principal("owner_a")
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert caught.value.retry_after == pytest.approx(1800.0)
    limits.check_principal("owner_b")
    clock.now += 1800
    limits.check_principal("owner_a")
