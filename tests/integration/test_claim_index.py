"""The claim index over a real key server (issue 21): the prior-claim check still refuses the
renaming and relabelling thefts when 1,000 registrations of the same family stand in front of
them, and replicas on one PostgreSQL database share one index through it.

The registry is filled fast (tests/registry_fill.py): a real first registration (an
independent digits CNN, the index group's anchor) and synthetic ones carrying its sealed key
and claim signatures near real independent models'. Alice registers after them, so her
host is one registration among a thousand; only the index's shortlist gets the full check.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_renamed_thefts import IDENTITY, Renamed
from torch import nn

import scheme_models as sm
from freemark.derive import derive_key
from freemark.errors import AlreadyRegisteredError
from freemark.formats.pt2 import save_program
from freemark.rpc import KeyServiceClient
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.handlers import panels
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.handlers.lookups import lookup
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.server import RunningServer, create_server
from freemark_lab.attacks.obfuscate import add_dummy_units, permute_units
from registry_fill import fill, key_signature
from ttp_fleet import add_principals, shared_keys, start_replica

TASK = "digits"
EARLIER = 1_000
PANEL_SEEDS = range(5)
ANCHOR_SEED = 30  # the hub's first registration: an independent model
BASE_SEEDS = range(31, 35)  # the synthetic signatures sit near these models'
OWNERS = [("hub", "owner"), ("alice", "owner"), ("mallory", "owner"), ("admin", "admin")]


@dataclass
class Server:
    """A running key server (or replica), its tokens and a folder for the uploads."""

    running: RunningServer
    tokens: dict[str, str]
    folder: Path

    @property
    def ctx(self) -> Context:
        return self.running.ctx

    def register(self, owner: str, label: str, model: nn.Module, seed: int,
                 references: Sequence[nn.Module] = (), layer: str = "act") -> str:
        task = sm.task(TASK)
        example = task.lab.sample_inputs(2)
        bundle = derive_key(model, layer=layer, triggers=task.lab.triggers(10, seed), owner=owner)
        path = self.folder / f"{label}.pt2"
        save_program(model, example, path)
        panel = []
        for number, reference in enumerate(references):
            panel.append(self.folder / f"{label}-reference{number}.pt2")
            save_program(reference, example, panel[-1])
        with KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[owner],
                              timeout=1800) as client:
            return client.register(bundle, path, references=panel).registration_id

    def refused(self, label: str, model: nn.Module, seed: int, layer: str) -> None:
        """Mallory's Register (his key on `layer`) is refused ALREADY_EXISTS with the fixed
        message, adding nothing."""
        size = self.ctx.store.tree_size()
        with pytest.raises(AlreadyRegisteredError) as caught:
            self.register("mallory", label, model, seed, layer=layer)
        assert caught.value.message.endswith(CLAIMED), str(caught.value)
        assert self.ctx.store.tree_size() == size

    def every_registration_indexed(self) -> bool:
        """Whether the index ranks every logged registration (none is checked in full by
        default), so a refusal came from the index's shortlist."""
        self.ctx.claims.refresh(self.ctx.store)
        states = self.ctx.ledger.read(self.ctx.store, lambda registry: registry.all())
        return all(self.ctx.claims.indexed(s.registration_id) for s in states)


def _hub(server: Server, count: int) -> str:
    """The hub's real first registration and `count` - 1 synthetic ones after it."""
    anchor_id = server.register("hub", "anchor", sm.independent(TASK, ANCHOR_SEED), seed=ANCHOR_SEED)
    anchor = lookup(server.ctx, anchor_id)
    assert anchor is not None
    triggers = panels.open_sealed(server.ctx, anchor)[0].triggers
    fill(server.ctx, anchor, count - 1,
         [key_signature(sm.independent(TASK, s), triggers) for s in BASE_SEEDS], owner="hub")
    return anchor_id


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("hub")
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1)
    server = Server(create_server(config), add_principals(config.database, OWNERS), folder)
    try:
        _hub(server, EARLIER)
        server.register("alice", "host", sm.host(TASK), seed=0,
                        references=[sm.independent(TASK, s) for s in PANEL_SEEDS])
        assert server.ctx.store.tree_size() == EARLIER + 1
        yield server
    finally:
        server.running.stop(0)


def test_a_renamed_finetuned_copy_is_refused_among_1000_registrations(hub: Server) -> None:
    names = {"features": "body", "flatten": "squash", "fc1": "proj", "act": "gate",
             "fc2": "classify"}
    hub.refused("renamed", Renamed(sm.finetuned(TASK), names), seed=7, layer="gate")
    assert hub.every_registration_indexed()


def test_a_relabelled_padded_finetuned_copy_is_refused_among_1000_registrations(
        hub: Server) -> None:
    lab = sm.task(TASK).lab
    stolen = add_dummy_units(permute_units(sm.finetuned(TASK), lab, seed=3), lab, count=16,
                             mode="split")
    hub.refused("relabelled", Renamed(stolen, {**IDENTITY, "act": "act2"}), seed=8, layer="act2")
    assert hub.every_registration_indexed()


def test_an_independent_model_still_registers_among_1000_registrations(hub: Server) -> None:
    rid = hub.register("mallory", "independent", sm.independent(TASK, 57), seed=9)
    hub.ctx.claims.refresh(hub.ctx.store)
    assert hub.ctx.claims.indexed(rid)  # its own signature was stored with it


def test_replicas_on_postgres_share_one_index(pg_db: str, tmp_path: Path) -> None:
    """Alice registers through replica A; the renamed copy of her exact weights is refused by
    replica B, whose index learned her registration from the database, not from A; what B
    registers, A's index ranks next."""
    keys = shared_keys(tmp_path / "keys")
    tokens = add_principals(pg_db, OWNERS)
    a = Server(start_replica(pg_db, tmp_path / "a", keys), tokens, tmp_path)
    b = Server(start_replica(pg_db, tmp_path / "b", keys), tokens, tmp_path)
    try:
        _hub(a, 200)
        alice = a.register("alice", "host", sm.host(TASK), seed=0)
        b.refused("renamed-weights", Renamed(sm.host(TASK), {**IDENTITY, "fc2": "head"}), seed=6,
                  layer="act")
        assert b.ctx.claims.indexed(alice) and b.every_registration_indexed()
        independent = b.register("mallory", "independent", sm.independent(TASK, 58), seed=9)
        assert a.every_registration_indexed() and a.ctx.claims.indexed(independent)
        assert b.every_registration_indexed()
        assert len(a.ctx.claims) == len(b.ctx.claims) == 202
    finally:
        a.running.stop(0)
        b.running.stop(0)
