"""What the HTTP client may do: the operator's allow-list, deadlines, caps and budgets.

An `EndpointPolicy` is a value: the key server builds one from its settings
(`serve --endpoint-allow ...`) and every verification runs under it; an owner's
`extract --endpoint` builds one from the URL it was given. The allow-list is checked on the
addresses a name resolves to, not on the name alone, because a name is whatever its DNS
says at the moment of asking (rebinding, a name pointing at 169.254.169.254). The rules:

- an entry is a host name (`models.example.com`), an address (`127.0.0.1`, `::1`) or a
  network in CIDR form (`10.8.0.0/16`); nothing is allowed by default;
- an address literal in a URL must lie in a listed address or network;
- a listed name allows its own *public* (globally routable) addresses; a loopback, private,
  link-local or otherwise special address is allowed only where an address or network entry
  names it, so "loopback only when named" holds whatever a listed name resolves to;
- every address a name resolves to must pass, not just one, and the connection goes to an
  address that passed (`freemark.endpoint.transport`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from freemark.errors import EndpointNotAllowedError, InvalidInputError

__all__ = ["Address", "EndpointPolicy", "Network", "normalise_address"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A DNS name as an allow-list entry or URL host: letters, digits, hyphens, dots (no wildcards:
# an operator names each host, or a network).
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


_CIDR = re.compile(r"^[0-9a-f:.]+/[0-9]+$")


def normalise_address(text: str) -> Address:
    """An address as `ipaddress` has it, IPv4-mapped IPv6 (`::ffff:127.0.0.1`) unwrapped, so a
    mapped form can neither slip past a network entry nor be refused by one it is inside."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _entry(raw: str) -> Network | str:
    text = raw.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        if _CIDR.match(text):
            network = ipaddress.ip_network(text, strict=True)
        else:
            address = normalise_address(text)
            network = ipaddress.ip_network(address)
    except ValueError as e:
        if _CIDR.match(text):
            raise InvalidInputError(
                f"endpoint allow-list entry {raw!r} is not a network: {e} (write the network "
                "address with its prefix, e.g. 10.8.0.0/16)") from None
    else:
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and \
                network.network_address.ipv4_mapped is not None:
            raise InvalidInputError(f"endpoint allow-list entry {raw!r}: write IPv4 networks in "
                                    "IPv4 form")
        return network
    if not _NAME.match(text):
        raise InvalidInputError(
            f"endpoint allow-list entry {raw!r} is neither a host name, an address nor a CIDR "
            "network (wildcards are not supported: list each host, or its network)")
    return text


@dataclass(frozen=True)
class EndpointPolicy:
    """The limits of one HTTP client of prediction endpoints; every field has a safe default.

    Deadlines: `connect_timeout_s` for the TCP (and TLS) handshake, `read_timeout_s` for any
    one wait on the socket, `total_timeout_s` for the whole conversation of one verification
    (metadata and every batch), so an endpoint that drips a byte just inside the read deadline
    is still cut off. Caps: `max_response_bytes` per body, counted while reading;
    `max_batch` inputs and `max_request_bytes` per infer request (a batch whose JSON is over
    it is split); `query_budget` inputs per verification, repeats included. Consistency: `repeats` inputs are sent a second time, shuffled among the rest,
    and at most `max_disagreement` of them may be answered differently (top-1 class). Rate:
    `rate_inputs` inputs per `rate_window_s` seconds per endpoint (origin), enforced by an
    `EndpointRateLimiter` the caller keeps across verifications.
    """

    allow: tuple[str, ...] = ()
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 120.0
    max_response_bytes: int = 8 * 2**20
    max_batch: int = 64
    max_request_bytes: int = 8 * 2**20
    query_budget: int = 2048
    repeats: int = 32
    max_disagreement: float = 0.1
    rate_inputs: int = 8192
    rate_window_s: float = 3600.0
    networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            raise InvalidInputError("EndpointPolicy.allow is a sequence of entries, not one string")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "rate_window_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"EndpointPolicy.{name} must be positive")
        for name in ("max_response_bytes", "max_batch", "max_request_bytes", "query_budget",
                     "rate_inputs"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"EndpointPolicy.{name} must be at least 1")
        if self.repeats < 0 or not 0.0 <= self.max_disagreement < 1.0:
            raise InvalidInputError("EndpointPolicy: repeats must be >= 0 and max_disagreement "
                                    "in [0, 1)")
        entries = [_entry(raw) for raw in self.allow]
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "networks", tuple(e for e in entries if not isinstance(e, str)))
        object.__setattr__(self, "names", frozenset(e for e in entries if isinstance(e, str)))

    def check_host(self, host: str) -> None:
        """Refuse a URL host the allow-list cannot admit whatever it resolves to (before DNS)."""
        if not self.allow:
            raise EndpointNotAllowedError(
                f"endpoint host {host!r} refused: the endpoint allow-list is empty, so no "
                "endpoint may be queried (the operator names hosts or networks with "
                "`freemark-keyserver serve --endpoint-allow HOST_OR_CIDR`)")
        try:
            address = normalise_address(host)
        except ValueError:
            return  # a name: judged on what it resolves to (check_addresses)
        self._check_address(host, address)

    def check_addresses(self, host: str, addresses: list[Address]) -> None:
        """Refuse unless every address `host` resolved to is admitted (see the module rules)."""
        for address in addresses:
            self._check_address(host, address)

    def _check_address(self, host: str, address: Address) -> None:
        if any(address in network for network in self.networks):
            return
        if host in self.names and address.is_global:
            return
        why = ("it is not a public address, and only an address or network entry admits a "
               "loopback, private or link-local one") if host in self.names else \
            "no allow-list entry admits it"
        shown = host if host == str(address) else f"{host} (resolved to {address})"
        raise EndpointNotAllowedError(
            f"endpoint {shown} refused: {why}; the operator may allow it with "
            f"`--endpoint-allow {address}` or its network")
