"""Operator panel poisoning (issue 18, item 7) over a real key server and its real sandbox.

The attack: the operator's panel for the digits CNN family gets one member that is a
fine-tuned copy of a host its owner has not registered yet (three honest, independently
trained members beside it). The owner then registers the host with no references of his
own, so the operator's panel is what calibrates his verdicts. On main the copy joined the
sealed panel, its rate became the null's, and the owner's stolen copy (fine-tuned, its key
layer relabelled) came out `inconclusive` at p = 1, with nothing in the receipt to say so.

Here the member is left out and named in the signed receipt, the stolen copy is a `match`,
and the receipt verifies offline (`freemark receipt verify` checks that the members it lists
as sealed are the panel it signs). Controls: the same panel, poisoned member included, is
honest for another owner's host (nothing left out, no warning, his relabelled copy
matches). A panel whose majority leans toward the host cannot be told from a weak one: it
is refused with PANEL_TOO_WEAK by default, and registered with a signed warning where the
operator chose `--panel-reach warn`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

import scheme_models as sm
from freemark.audit.receipt import save_statement, verify_receipt
from freemark.derive import derive_key
from freemark.errors import PanelTooWeakError
from freemark.formats.pt2 import save_program
from freemark.records.types import Receipt, ReferencePanel
from freemark.rpc import KeyServiceClient
from freemark_keyserver.config import UNLIMITED, ServerConfig, default_policy
from freemark_keyserver.handlers.panels import add_panel_member
from freemark_keyserver.server import RunningServer, create_server
from freemark_lab.attacks import obfuscate as ob
from freemark_lab.attacks.finetune import finetune
from ttp_fixtures import cli_env, run_cli
from ttp_fleet import add_principals

TASK = "digits"
ALPHA = 1e-9
HONEST = (0, 1, 2)  # the operator's honest members: independently trained digits CNNs
BOB_HOST = 3  # the family's first registration, which `panel add --like` names
CAROL_HOST = 4  # the control owner's host


def _poison(seed: int) -> nn.Module:
    """A fine-tuned copy of the owner's host (the scheme tests' recipe, another seed), as an
    operator panel member."""
    task = sm.task(TASK)
    return finetune(sm.host(TASK), task.lab, epochs=task.recipe.finetune_epochs, lr=1e-3,
                    seed=seed)


@dataclass
class Server:
    """A running key server with its principals and a folder of exported models."""

    folder: Path
    running: RunningServer
    tokens: dict[str, str]

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=600)

    def export(self, label: str, model: nn.Module) -> Path:
        path = self.folder / f"{label}.pt2"
        if not path.exists():
            save_program(model, sm.task(TASK).lab.sample_inputs(2), path)
        return path

    def add_member(self, label: str, model: nn.Module, like: str) -> str:
        """The operator's `panel add`, in process: vetted and read in the real sandbox."""
        member = add_panel_member(self.running.ctx, self.export(label, model), like=like,
                                  label=label, now=time.time_ns() // 1000)
        return member.member_id

    def register(self, who: str, host: nn.Module, label: str, seed: int) -> Receipt:
        task = sm.task(TASK)
        bundle = derive_key(host, layer="act", triggers=task.lab.triggers(10, seed), owner=who)
        with self.client(who) as client:
            return client.register(bundle, self.export(label, host))

    def verify(self, registration_id: str, label: str, model: nn.Module) -> tuple[str, float]:
        with self.client("judge") as client:
            verdict = client.verify(registration_id, self.export(label, model))
            verify_receipt(verdict, client.public_key())
        return verdict.outcome, verdict.p_value


def _start(folder: Path, **settings: object) -> Server:
    # The judge reads p-values (full disclosure); the tests register and verify more than a
    # principal's hourly budget.
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                          verdict_policy=default_policy("full"), verify_rate_principal=UNLIMITED,
                          verify_rate_registration=UNLIMITED, register_rate_principal=UNLIMITED,
                          **settings)  # type: ignore[arg-type]
    return Server(folder, create_server(config), {})


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server whose digits family panel has three honest members and one poisoned one."""
    server = _start(tmp_path_factory.mktemp("poisoned"))
    server.tokens = add_principals(server.running.ctx.config.database, [
        ("bob", "owner"), ("alice", "owner"), ("carol", "owner"), ("judge", "arbiter")])
    try:
        like = server.register("bob", sm.independent(TASK, BOB_HOST), "bob-host", 3)
        members = {f"honest{seed}": server.add_member(f"honest{seed}",
                                                      sm.independent(TASK, seed),
                                                      like.registration_id)
                   for seed in HONEST}
        members["poison"] = server.add_member("poison", _poison(11), like.registration_id)
        yield server, members
    finally:
        server.running.stop(0)


def test_a_poisoned_operator_member_is_left_out_and_named_in_the_receipt(
        poisoned: tuple[Server, dict[str, str]]) -> None:
    server, members = poisoned
    receipt = server.register("alice", sm.host(TASK), "alice-host", 0)
    listed = {m.member_id: m for m in receipt.panel_members}
    assert set(listed) == set(members.values())
    assert all(m.source == "operator" for m in listed.values())
    left_out = listed[members["poison"]]
    print(f"\nthe poisoned member, left out: {left_out.left_out}")
    assert not left_out.sealed and "leans toward the host" in left_out.left_out
    assert all(listed[members[f"honest{seed}"]].sealed for seed in HONEST)
    assert receipt.panel == ReferencePanel.of(
        [m.fingerprint for m in receipt.panel_members if m.sealed])
    assert receipt.panel.size == len(HONEST) and receipt.panel_warning == ""
    with server.client("alice") as client:
        verify_receipt(receipt, client.public_key())

    # The owner's stolen copy: fine-tuned, its key layer relabelled. On main: inconclusive, p = 1.
    task = sm.task(TASK).lab
    outcome, p_value = server.verify(receipt.registration_id, "alice-stolen",
                                     ob.permute_units(sm.finetuned(TASK), task, seed=8))
    print(f"\nalice's stolen copy with the poisoned member left out: {outcome}, p = {p_value:.1e}")
    assert outcome == "match" and p_value <= ALPHA

    # `freemark receipt verify` shows who brought each member, and checks the list.
    path = server.folder / "alice-receipt.json"
    save_statement(path, receipt)
    pem = server.folder / "ttp.pem"
    with server.client("alice") as client:
        pem.write_bytes(client.public_key())
    shown = run_cli("freemark.cli", "receipt", "verify", str(path), "--public-key", str(pem),
                    env=cli_env())
    assert "panel members" in shown.stdout and members["poison"] in shown.stdout
    assert "left out: leans toward the host" in shown.stdout
    tampered = json.loads(path.read_text())
    tampered["body"]["panel_members"][0]["left_out"] = "edited"
    path.write_text(json.dumps(tampered))
    refused = run_cli("freemark.cli", "receipt", "verify", str(path), "--public-key", str(pem),
                      env=cli_env(), check=False)
    assert refused.returncode == 1 and "FAILED" in refused.stderr


def test_the_same_panel_is_honest_for_another_host(poisoned: tuple[Server, dict[str, str]]
                                                   ) -> None:
    """No false alarm: for carol's host the fine-tune of alice's is one more independent
    model, so all four members are sealed, with no warning, and her relabelled copy matches."""
    server, members = poisoned
    carol = sm.independent(TASK, CAROL_HOST)
    receipt = server.register("carol", carol, "carol-host", 2)
    assert {m.member_id for m in receipt.panel_members if m.sealed} == set(members.values())
    assert receipt.panel.size == len(members) and receipt.panel_warning == ""
    outcome, p_value = server.verify(receipt.registration_id, "carol-permuted",
                                     ob.permute_units(carol, sm.task(TASK).lab, seed=8))
    assert outcome == "match" and p_value <= ALPHA


@dataclass(frozen=True)
class Majority:
    """A stopped server's data dir, its principals' tokens and its family's panel members."""

    folder: Path
    tokens: dict[str, str]
    members: dict[str, str]


@pytest.fixture(scope="module")
def majority(tmp_path_factory: pytest.TempPathFactory) -> Majority:
    """A data dir whose family panel is two fine-tuned copies of alice's host and one honest
    member: no lower half is clean, so nothing can be told to lean."""
    folder = tmp_path_factory.mktemp("majority")
    server = _start(folder)
    server.tokens = add_principals(server.running.ctx.config.database, [
        ("bob", "owner"), ("alice", "owner"), ("judge", "arbiter")])
    try:
        like = server.register("bob", sm.independent(TASK, BOB_HOST), "bob-host", 3)
        members = {"honest": server.add_member("honest", sm.independent(TASK, 0),
                                               like.registration_id),
                   "poison-a": server.add_member("poison-a", _poison(11), like.registration_id),
                   "poison-b": server.add_member("poison-b", _poison(12), like.registration_id)}
    finally:
        server.running.stop(0)
    return Majority(folder, server.tokens, members)


def test_a_panel_that_cannot_reach_alpha_is_refused_then_warned(majority: Majority) -> None:
    names = majority.members
    server = dataclasses.replace(_start(majority.folder), tokens=majority.tokens)  # refuse
    try:
        with pytest.raises(PanelTooWeakError) as caught:
            server.register("alice", sm.host(TASK), "alice-host", 0)
        message = str(caught.value)
        print(f"\nrefused: {message}")
        assert caught.value.code.name == "FAILED_PRECONDITION"
        assert "a relabelled copy of the host would get at best" in message
        assert "not a match at alpha 1e-09" in message
        assert names["poison-a"] in message and names["poison-b"] in message
        assert "add independent references" in message
        with server.client("alice") as client:
            assert not [r for r in client.list_registrations() if r.owner == "alice"]
    finally:
        server.running.stop(0)

    server = dataclasses.replace(_start(majority.folder, panel_reach="warn"),
                                 tokens=majority.tokens)
    try:
        receipt = server.register("alice", sm.host(TASK), "alice-host", 0)
        assert "a relabelled copy of the host would get at best" in receipt.panel_warning
        assert receipt.panel.size == 3 and all(m.sealed for m in receipt.panel_members)
        with server.client("alice") as client:
            verify_receipt(receipt, client.public_key())
    finally:
        server.running.stop(0)
