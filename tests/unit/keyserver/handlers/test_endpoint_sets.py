"""Which query set a VerifyEndpoint sends (`handlers.endpoints.choose_set`): a set no
endpoint has seen while one remains, then the least-disclosed, so many endpoints never run
out of sets."""

from __future__ import annotations

from freemark_keyserver.handlers.endpoints import choose_set


def test_an_unused_set_is_chosen_while_one_remains() -> None:
    assert choose_set(4, []) == (0, 0)
    assert choose_set(4, [(0, "http://a:1")]) == (1, 0)
    assert choose_set(4, [(0, "http://a:1"), (1, "http://b:1"), (3, "http://c:1")]) == (2, 0)


def test_the_same_endpoint_gets_a_fresh_set_too() -> None:
    """A set an endpoint saw is one it could prepare for: a fresh one is better evidence."""
    assert choose_set(2, [(0, "http://a:1")]) == (1, 0)


def test_once_every_set_is_disclosed_the_least_disclosed_is_reused() -> None:
    seen = [(0, "http://a:1"), (0, "http://b:1"), (1, "http://c:1")]
    assert choose_set(2, seen) == (1, 1)
    # many endpoints, two sets: never a failure for want of sets
    many = [(k % 2, f"http://e{k}:1") for k in range(50)]
    assert choose_set(2, many) == (0, 25)


def test_an_endpoint_counts_once_per_set() -> None:
    assert choose_set(2, [(0, "http://a:1"), (0, "http://a:1"), (1, "http://b:1"),
                          (1, "http://c:1")]) == (0, 1)
