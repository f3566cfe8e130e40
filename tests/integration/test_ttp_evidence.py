"""What the TTP's word is worth in a dispute, over a real server on loopback (issue 11).

Register as an oracle: the prior-claim refusal says only that a claim exists and is logged
with the caller; a run of the uploader's program that fails on another owner's triggers
answers exactly like a non-claim (the Register goes on), so a failure cannot betray them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_status import rpc_status

from freemark.bundle import KeyBundle
from freemark.derive import derive_key
from freemark.errors import AlreadyRegisteredError
from freemark.modelfile import load_program
from freemark.probes import DEFAULT_PROBES
from freemark.records import Receipt
from freemark.rpc import KeyServiceClient
from freemark.triggers import load_triggers, select_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.handlers import CLAIMED
from freemark_keyserver.sandbox import SandboxLimits
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from freemark_lab import data
from ttp_fixtures import ModelFiles, build_models

PRINCIPALS = (("owner_a", "owner"), ("owner_b", "owner"), ("arbiter", "arbiter"))


@dataclass
class World:
    """A running server, its principals' tokens, the models and owner A's receipt."""

    config: ServerConfig
    running: RunningServer
    tokens: dict[str, str]
    files: ModelFiles
    receipt: Receipt

    def client(self, caller: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[caller],
                                timeout=300)


def _key(model: Path, owner: str, *, per_class: int, seed: int) -> KeyBundle:
    ds = data.digits()
    triggers = select_triggers(ds.x_train, ds.y_train, per_class=per_class, seed=seed)
    return derive_key(load_program(model), layer="act", owner=owner, triggers=triggers)


def _start(config: ServerConfig, tokens: dict[str, str]) -> RunningServer:
    running = create_server(config)
    for name, role in PRINCIPALS:
        if running.ctx.store.principal_by_name(name) is None:
            running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    return running


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_models(tmp_path_factory.mktemp("evidence-models"))


@pytest.fixture(scope="module")
def world(files: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("evidence") / "ttp",
                          listen="127.0.0.1:0", grace_seconds=1)
    tokens = {name: new_token() for name, _ in PRINCIPALS}
    running = _start(config, tokens)
    bundle = derive_key(load_program(files.host), layer="act", owner="owner_a",
                        triggers=load_triggers(files.triggers))
    with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens["owner_a"],
                          timeout=300) as client:
        receipt = client.register(bundle, files.host)
    w = World(config, running, tokens, files, receipt)
    yield w
    w.running.stop(grace=1)


def _claim_lines(caplog: pytest.LogCaptureFixture, who: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "freemark_keyserver" and r.getMessage().startswith(f"Register by {who}")]


def test_the_prior_claim_refusal_says_only_that_a_claim_exists(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Owner B registers A's exact host under his own key: ALREADY_EXISTS with the fixed
    message (no id, no figure, nothing in the ErrorInfo), and the operator's log names B and
    the registration that claims it."""
    caplog.set_level(logging.INFO, logger="freemark_keyserver")
    bundle = _key(world.files.host, "owner_b", per_class=2, seed=5)
    with world.client("owner_b") as client, pytest.raises(AlreadyRegisteredError) as caught:
        client.register(bundle, world.files.host)
    assert str(caught.value) == f"ALREADY_CLAIMED: model already registered: {CLAIMED}"
    status = rpc_status.from_call(caught.value.__cause__)  # the grpc.RpcError behind it
    assert status is not None and len(status.details) == 1
    assert "metadata" not in str(status.details[0]) and world.receipt.registration_id.encode() \
        not in status.details[0].value
    lines = _claim_lines(caplog, "owner_b")
    assert lines and world.receipt.registration_id in lines[-1].getMessage()
    assert "refused" in lines[-1].getMessage() and lines[-1].created > 0


def test_a_failing_run_on_another_owners_triggers_answers_like_a_non_claim(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The operator lowers the sandbox's output cap below what a run on A's 100 triggers
    returns, but above B's 10: B's upload fails only when read with A's key. B's Register
    of his own, independent model must go on exactly as a non-claim does (a receipt), and
    the failure shows in the operator's log only."""
    caplog.set_level(logging.INFO, logger="freemark_keyserver")
    row = 128 * 8  # one input's activations at the act layer, float64
    cap = (DEFAULT_PROBES + 55) * row  # between B's run (1024 + 10 rows) and A's (1024 + 100)
    data_dir = tmp_path / "ttp"
    tokens = {name: new_token() for name, _ in PRINCIPALS}
    config = dataclasses.replace(world.config, data_dir=data_dir)
    running = _start(config, tokens)
    try:
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens["owner_a"],
                              timeout=300) as client:
            client.register(_key(world.files.host, "owner_a", per_class=10, seed=0),
                            world.files.host)
    finally:
        running.stop(grace=1)
    tight = dataclasses.replace(config, sandbox=SandboxLimits(max_output_bytes=cap))
    running = _start(tight, tokens)
    try:
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens["owner_b"],
                              timeout=300) as client:
            receipt = client.register(_key(world.files.independent, "owner_b", per_class=1,
                                           seed=3), world.files.independent)
    finally:
        running.stop(grace=1)
    assert receipt.owner == "owner_b" and receipt.log_index == 1
    lines = _claim_lines(caplog, "owner_b")
    assert any("treated as no match" in r.getMessage() and "max_output_bytes" in r.getMessage()
               for r in lines), [r.getMessage() for r in lines]
