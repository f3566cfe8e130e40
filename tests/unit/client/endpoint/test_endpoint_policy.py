"""EndpointPolicy and the session's URL rules: what the allow-list admits, on addresses
after resolution, and which URLs and settings are refused before any lookup."""

from __future__ import annotations

import ipaddress

import pytest

from freemark.endpoint import EndpointPolicy, EndpointSession
from freemark.endpoint.policy import normalise_address
from freemark.errors import EndpointNotAllowedError, InvalidInputError
from hostile_endpoints import Resolver


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return normalise_address(text)


def test_entries_are_names_addresses_or_networks() -> None:
    policy = EndpointPolicy(allow=("Models.Example.COM.", "127.0.0.1", "[::1]", "10.8.0.0/16"))
    assert policy.names == {"models.example.com"}
    assert [str(n) for n in policy.networks] == ["127.0.0.1/32", "::1/128", "10.8.0.0/16"]


@pytest.mark.parametrize(("entry", "match"), [
    ("10.8.0.1/16", "not a network"),  # host bits set: a typo, not a network
    ("*.example.com", "wildcards"),
    ("http://example.com", "neither"),
    ("", "neither"),
])
def test_malformed_entries_are_refused_with_what_to_write(entry: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        EndpointPolicy(allow=(entry,))


def test_a_single_string_is_not_taken_as_a_list_of_characters() -> None:
    with pytest.raises(InvalidInputError, match="sequence"):
        EndpointPolicy(allow="10.0.0.0/8")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["connect_timeout_s", "read_timeout_s", "total_timeout_s",
                                   "max_response_bytes", "max_batch", "query_budget"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        EndpointPolicy(**{field: 0})  # type: ignore[arg-type]


def test_names_admit_public_addresses_networks_admit_any() -> None:
    policy = EndpointPolicy(allow=("models.example.com", "10.8.0.0/16"))
    policy.check_addresses("models.example.com", [_ip("93.184.216.34")])
    policy.check_addresses("anything.internal", [_ip("10.8.3.4")])
    for special in ("127.0.0.1", "169.254.169.254", "10.9.0.1", "192.168.1.1", "::1",
                    "fe80::1", "0.0.0.0", "::ffff:169.254.169.254"):
        with pytest.raises(EndpointNotAllowedError):
            policy.check_addresses("models.example.com", [_ip(special)])
    with pytest.raises(EndpointNotAllowedError, match="no allow-list entry admits"):
        policy.check_addresses("other.example.com", [_ip("93.184.216.34")])


def test_an_address_literal_in_a_url_is_judged_before_any_lookup() -> None:
    policy = EndpointPolicy(allow=("10.8.0.0/16",))
    policy.check_host("10.8.0.7")
    with pytest.raises(EndpointNotAllowedError, match="127.0.0.1"):
        policy.check_host("127.0.0.1")
    with pytest.raises(EndpointNotAllowedError, match="allow-list is empty"):
        EndpointPolicy().check_host("10.8.0.7")


@pytest.mark.parametrize(("url", "match"), [
    ("ftp://127.0.0.1:21", "http or https"),
    ("http://user:pw@127.0.0.1:8080", "credentials"),
    ("http://127.0.0.1:8080/?x=1", "without a query"),
    ("http://127.0.0.1:99999", "malformed"),
    ("http://127.0.0.1:8080/a/../b", "path"),
    ("http://:8080", "no host"),
])
def test_urls_that_are_not_a_plain_base_are_refused(url: str, match: str) -> None:
    resolver = Resolver([["127.0.0.1"]])
    with pytest.raises(InvalidInputError, match=match):
        EndpointSession(url, "m", policy=EndpointPolicy(allow=("127.0.0.1",)), resolver=resolver)
    assert resolver.calls == []


@pytest.mark.parametrize("name", ["../admin", "m/infer", "", "m?x", "a" * 200])
def test_model_names_cannot_reach_other_paths(name: str) -> None:
    with pytest.raises(InvalidInputError, match="model name"):
        EndpointSession("http://127.0.0.1:8080", name, policy=EndpointPolicy(allow=("127.0.0.1",)))


def test_a_path_prefix_is_kept_and_the_endpoint_normalised() -> None:
    session = EndpointSession("http://Models.Test.:8080/serving/", "m",
                              policy=EndpointPolicy(allow=("127.0.0.1",)),
                              resolver=Resolver([["127.0.0.1"]]))
    assert session.endpoint == "http://models.test:8080/serving"
    assert session.address == "127.0.0.1"
