"""The health/reflection stream slots (issue 18 5(c)): counted by peer address, at most
EXEMPT_STREAMS_PER_PEER from one, the greediest peer's oldest stream given up to a peer that
holds fewer when all are held, and every stream cancelled past its lifetime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from freemark_keyserver.config import EXEMPT_STREAMS, EXEMPT_STREAMS_PER_PEER, ServerConfig
from freemark_keyserver.rpc.calls import CallRegistry, ExemptStream, peer_address
from freemark_keyserver.store import open_store


@dataclass(eq=False)
class Peer:
    """What the registry reads of a server context: its peer, and cancel()."""

    address: str
    cancelled: bool = False

    def peer(self) -> str:
        return self.address

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    config = ServerConfig(data_dir=tmp_path, exempt_stream_lifetime=60.0)
    store = open_store(config.database)
    yield CallRegistry(store, config.call_limits)
    store.close()


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:10.0.0.7:5123", "10.0.0.7"),
    ("ipv6:[2001:db8::1]:5123", "2001:db8::/64"),
    ("ipv6:%5B2001:db8::ffff:1%5D:80", "2001:db8::/64"),  # grpc's spelling
    ("ipv6:%5B::1%5D:39046", "::/64"),
    ("ipv6:[::ffff:10.0.0.7]:5123", "10.0.0.7"),
    ("unix:/run/freemark.sock", "unix"),
    ("nonsense", "nonsense"),
])
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_one_peer_holds_at_most_its_share(registry: CallRegistry) -> None:
    flood = [registry.admit_exempt_stream(Peer(f"ipv4:10.0.0.7:{port}"))  # type: ignore[arg-type]
             for port in range(1000, 1020)]
    held = [s for s in flood if s is not None]
    assert len(held) == EXEMPT_STREAMS_PER_PEER
    assert registry.exempt_streams("10.0.0.7") == EXEMPT_STREAMS_PER_PEER
    assert registry.admit_exempt_stream(Peer("ipv4:10.0.0.8:1")) is not None  # type: ignore[arg-type]
    for stream in held:
        registry.release_exempt_stream(stream)
    assert registry.exempt_streams("10.0.0.7") == 0


def test_a_peer_holding_nothing_is_served_when_every_slot_is_held(registry: CallRegistry) -> None:
    contexts = [Peer(f"ipv4:10.0.1.{i // EXEMPT_STREAMS_PER_PEER}:{i}")
                for i in range(EXEMPT_STREAMS)]
    held = [registry.admit_exempt_stream(c) for c in contexts]  # type: ignore[arg-type]
    assert all(held) and registry.exempt_streams() == EXEMPT_STREAMS
    newcomer = registry.admit_exempt_stream(Peer("ipv4:192.0.2.1:1"))  # type: ignore[arg-type]
    assert isinstance(newcomer, ExemptStream)
    # The oldest stream of a peer holding the most was cancelled and its slot given up.
    assert [c.cancelled for c in contexts] == [True] + [False] * (EXEMPT_STREAMS - 1)
    assert registry.exempt_streams() == EXEMPT_STREAMS
    # Releasing an evicted stream (its handler ending) frees nothing twice.
    first = held[0]
    assert first is not None
    registry.release_exempt_stream(first)
    assert registry.exempt_streams() == EXEMPT_STREAMS


def test_peers_holding_as_many_as_each_other_evict_nobody(registry: CallRegistry) -> None:
    contexts = [Peer(f"ipv4:10.0.2.{i}:1") for i in range(EXEMPT_STREAMS)]
    assert all(registry.admit_exempt_stream(c) for c in contexts)  # type: ignore[arg-type]
    assert registry.admit_exempt_stream(Peer("ipv4:10.0.2.0:2")) is None  # type: ignore[arg-type]
    assert not any(c.cancelled for c in contexts)
    assert registry.admit_exempt_stream(Peer("ipv4:10.0.3.0:2")) is not None  # type: ignore[arg-type]
    assert [c.cancelled for c in contexts] == [True] + [False] * (EXEMPT_STREAMS - 1)


def test_streams_are_cancelled_past_their_lifetime(registry: CallRegistry) -> None:
    clock = Clock()
    old = Peer("ipv4:10.0.0.7:1")
    young = Peer("ipv4:10.0.0.8:1")
    assert registry.admit_exempt_stream(old, clock) is not None  # type: ignore[arg-type]
    clock.now += 30
    assert registry.admit_exempt_stream(young, clock) is not None  # type: ignore[arg-type]
    clock.now += 30
    registry.end_old_exempt_streams(clock)
    assert (old.cancelled, young.cancelled) == (True, False)
    assert registry.exempt_streams() == 1
    clock.now += 30
    registry.end_old_exempt_streams(clock)
    assert young.cancelled and registry.exempt_streams() == 0
