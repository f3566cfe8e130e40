"""What the TTP's word is worth in a dispute, over a real server on loopback (issue 11).

Verdicts: an alpha outside the operator's policy is refused (no framing at alpha = 0.99);
the signed body binds alpha, outcome, the suspect's SHA-256 and size, the requester and the
policy; requesters other than the owner get a coarse verdict by default; and `freemark
receipt verify --model` refuses a genuine verdict handed over as evidence about another file.

Register as an oracle: the prior-claim refusal says only that a claim exists and is logged
with the caller; a run of the uploader's program that fails on another owner's triggers
answers exactly like a non-claim (the Register goes on), so a failure cannot betray them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_status import rpc_status

from freemark.audit.receipt import save_statement
from freemark.cli import main
from freemark.derive import derive_key
from freemark.errors import AlphaOutsidePolicyError, AlreadyRegisteredError
from freemark.formats.pt2 import load_program
from freemark.records.types import CoarseVerdict, Receipt, SignedVerdict
from freemark.records.wire import checkpoint_to_json, consistency_to_json
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.probes import DEFAULT_PROBES
from freemark.scheme.triggers import load_triggers, select_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.sandbox.runner import SandboxLimits
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from freemark_lab import data
from ttp_fixtures import ModelFiles, build_models

STATISTICS = {"matches", "ber", "p_value_method", "p_value_binomial", "log10_p_value_binomial",
              "tests"}

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


def _key(model: Path, owner: str, *, per_class: int, seed: int,
         probes: int = DEFAULT_PROBES) -> KeyBundle:
    ds = data.digits()
    triggers = select_triggers(ds.x_train, ds.y_train, per_class=per_class, seed=seed)
    return derive_key(load_program(model), layer="act", owner=owner, triggers=triggers,
                      probes=probes)


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


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_framing_at_a_lax_alpha_is_refused_naming_the_range(world: World) -> None:
    """Owner A asks for a verdict on an innocent model at alpha = 0.99: refused before the
    upload is judged, with the policy's range in the message, and nothing is logged."""
    before = world.running.ctx.store.tree_size()
    for alpha in (0.99, 1e-3, 1e-30):
        with world.client("owner_a") as client, pytest.raises(AlphaOutsidePolicyError) as caught:
            client.verify(world.receipt.registration_id, world.files.independent, alpha=alpha)
        assert caught.value.code.name == "INVALID_ARGUMENT"
        assert f"alpha {alpha:g} is outside" in str(caught.value)
        assert "alpha in [1e-12, 1e-06]" in str(caught.value)
    assert world.running.ctx.store.tree_size() == before


def test_the_signed_body_binds_alpha_outcome_suspect_requester_and_policy(world: World) -> None:
    with world.client("owner_a") as client:
        verdict = client.verify(world.receipt.registration_id, world.files.finetuned, alpha=1e-6)
    assert isinstance(verdict, SignedVerdict)  # the owner always gets the full verdict
    body = json.loads(verdict.statement.body)
    policy = world.config.verdict_policy
    assert body["alpha"] == 1e-6 and body["outcome"] == "match" and body["is_match"] is True
    assert body["suspect_sha256"] == _sha256(world.files.finetuned).hex()
    assert body["suspect_size"] == world.files.finetuned.stat().st_size
    assert body["requested_by"] == "owner_a"
    assert body["policy"] == {"alpha_min": 1e-12, "alpha_max": 1e-6,
                              "arbiter_disclosure": "coarse", "id": policy.id}
    assert STATISTICS <= set(body)


def test_an_arbiter_gets_a_coarse_verdict_without_the_statistics(world: World) -> None:
    """The default policy: requesters other than the owner get the decision and a p-value
    bucket, nothing to steer a laundering attempt by."""
    with world.client("arbiter") as client:
        match = client.verify(world.receipt.registration_id, world.files.finetuned)
        innocent = client.verify(world.receipt.registration_id, world.files.independent)
    for verdict, outcome in ((match, "match"), (innocent, "no_match")):
        assert isinstance(verdict, CoarseVerdict), type(verdict)
        body = json.loads(verdict.statement.body)
        assert body["kind"] == "freemark/v1/coarse-verdict" and body["outcome"] == outcome
        assert not STATISTICS & set(body), sorted(STATISTICS & set(body))
        assert body["requested_by"] == "arbiter" and body["alpha"] == 1e-9
        assert body["p_value_above"] < body["p_value"]
        assert (body["p_value"] <= body["alpha"]) == (outcome == "match")
    assert match.p_value <= 1e-20  # a fine-tuned copy: strong evidence, said coarsely


def test_receipt_verify_model_refuses_a_replayed_verdict(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A genuine verdict on the owner's own host (p far below alpha) handed over as evidence
    about another model: `freemark receipt verify --model OTHER` fails, `--model HOST`
    passes and prints what the statement says; `--checkpoint` checks it is in a later log."""
    with world.client("owner_a") as client:
        genuine = client.verify(world.receipt.registration_id, world.files.host)
        client.verify(world.receipt.registration_id, world.files.finetuned)  # the log grows
        pem = client.public_key()
        latest = client.get_checkpoint()
        proof = client.get_consistency_proof(genuine.inclusion.tree_size, latest.tree_size)
    assert genuine.outcome == "match"
    saved, key = tmp_path / "verdict.json", tmp_path / "ttp.pem"
    save_statement(saved, genuine)
    key.write_bytes(pem)
    base = ["receipt", "verify", str(saved), "--public-key", str(key)]

    assert main([*base, "--model", str(world.files.independent)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "is not the file this verdict is about" in err
    assert main([*base, "--model", str(world.files.host)]) == 0
    table = capsys.readouterr().out
    for shown in ("verdict", world.receipt.registration_id, "match", "alpha", "p_value",
                  _sha256(world.files.host).hex(), "integrated_time", "policy"):
        assert shown in table, shown

    later, consistency = tmp_path / "latest.json", tmp_path / "consistency.json"
    later.write_text(json.dumps(checkpoint_to_json(latest)))
    consistency.write_text(json.dumps(consistency_to_json(proof)))
    assert main([*base, "--checkpoint", str(consistency), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["kind"] == "verdict" and out["outcome"] == "match"
    assert out["suspect_sha256"] == _sha256(world.files.host).hex()
    receipt = tmp_path / "receipt.json"  # a receipt is about its host's weights
    save_statement(receipt, world.receipt)
    receipt_base = ["receipt", "verify", str(receipt), "--public-key", str(key), "--model"]
    assert main([*receipt_base, str(world.files.host)]) == 0
    assert main([*receipt_base, str(world.files.finetuned)]) == 1
    assert "is not the model this receipt registers" in capsys.readouterr().err

    assert latest.tree_size > genuine.inclusion.tree_size
    assert main([*base, "--checkpoint", str(later)]) == 1  # a bare later checkpoint: no proof
    assert "consistency proof" in capsys.readouterr().err


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


def test_a_failing_run_on_another_owners_triggers_answers_like_a_claim(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The operator lowers the sandbox's output cap below what a run on A's 100 triggers
    returns, but above B's 10 triggers and 20 probes: B's upload fails only when read with
    A's key (its triggers alone: A has no panel, so its probes would go unused). A run that
    cannot be judged is never a clearance (issue 18, item 2): B's Register is refused with
    the same fixed ALREADY_EXISTS as any claim, nothing is registered, and the failure shows
    in the operator's log only, by its class. (The price, documented: an independent model
    that cannot run on another owner's triggers is claimed until the operator looks.)"""
    caplog.set_level(logging.INFO, logger="freemark_keyserver")
    row = 128 * 4  # one input's activations at the act layer, float32 on the wire
    cap = 55 * row  # between B's run (10 + 20 rows) and A's (100)
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
            with pytest.raises(AlreadyRegisteredError) as caught:
                client.register(_key(world.files.independent, "owner_b", per_class=1, seed=3,
                                     probes=20), world.files.independent)
            assert list(client.list_registrations()) == []
    finally:
        running.stop(grace=1)
    assert "an earlier registration already claims this model" in str(caught.value)
    lines = _claim_lines(caplog, "owner_b")
    # by class name only: a failure's message may be computed from A's triggers (issue 18)
    assert any("a claim" in r.getMessage() and "(SandboxError)" in r.getMessage()
               for r in lines), [r.getMessage() for r in lines]
