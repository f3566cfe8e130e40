"""Output keys over the real key server and a real Open Inference Protocol server (issue 19).

Alice derives an output key on her digits host (tests/blackbox_models.py's models: one set
of 96 queries, all her 600 images allow, and a panel of 8 of two architectures) and registers it with her panel: the key server
reads the host and every reference through their outputs in its sandbox and logs a
commitment to each query set. A thief's fine-tuned copy is served by MLServer as a
labels-only and as a scores endpoint, and a held-out independent model as labels: the key
server queries them (allow-listed loopback) and signs `match`, `match`, `no_match`, each
checked offline. Hostile endpoints (outside the allow-list, a redirect, a gigabyte, malformed
JSON, answers that change with the asking, never answering) are refused with their status,
and nothing is signed or logged. An arbiter gets the coarse endpoint verdict. The copy as a
.pt2 file is judged on the output key in the sandbox (a signed file verdict), and its thief
cannot register it under a white-box key or an output key of his own: Alice's output key is
a prior claim on it. One key server, one MLServer per module.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import blackbox_models as bm
from freemark.audit.receipt import load_statement, save_statement, verify_receipt, verify_suspect
from freemark.blackbox.commit import query_set_commitment, query_set_commitments
from freemark.blackbox.judge import set_items
from freemark.blackbox.key import OutputKey, save_output_key
from freemark.blackbox.queries import derive_output_key
from freemark.derive import derive_key
from freemark.errors import ServerError
from freemark.formats.pt2 import save_program
from freemark.records.types import (
    AnyEndpointVerdict,
    CoarseEndpointVerdict,
    Receipt,
    SignedVerdict,
)
from freemark.rpc import KeyServiceClient
from freemark.scheme.triggers import select_triggers
from freemark.verdict.decision import COARSE_EDGES
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.server import RunningServer, create_server
from freemark_lab.train import train
from hostile_endpoints import Handler, Seen, endpoint, infer_reply, request_inputs
from oip_servers import OipServer, ServedModel, export_onnx, serve
from ttp_fixtures import cli_env, json_out, run_cli
from ttp_fleet import add_principals

SHAPE = (1, 8, 8)
QUERIES = 96
OWNER = "alice@example.com"
THIEF = "mallory@example.com"
BOB = "bob@example.com"
DIGITS_META = {"name": "m", "versions": ["1"], "platform": "toy",
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}],
               "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}


@dataclass
class World:
    folder: Path
    running: RunningServer
    tokens: dict[str, str]
    registration_id: str
    query_sets: tuple[bytes, ...]
    oip: OipServer
    public_key: bytes

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=600)

    def tree_size(self) -> int:
        return self.running.ctx.store.tree_size()

    def verify(self, who: str, url: str, model: str, **options: Any) -> AnyEndpointVerdict:
        with self.client(who) as client:
            return client.verify_endpoint(self.registration_id, url, model, **options)


def _thief_copy() -> nn.Module:
    """The host fine-tuned on the thief's own data (the test split), gently (the lab's
    harsher copy, `bm.finetuned`, reached log10 p -14.4 on one 48-query set and -5.2 on the
    other: stronger copies need the product's larger sets)."""
    d = bm.data()
    return train(copy.deepcopy(bm.host()), d.x_test, d.y_test, epochs=3, lr=1e-4, seed=6)


def _program(model: nn.Module, path: Path) -> Path:
    save_program(model, (torch.from_numpy(bm.data().x_train[:2]),), path)
    return path


@functools.cache
def output_key() -> OutputKey:
    """One set of 96 queries: a set of 48 (`bm.output_key`) gets at best log10 p -6.9 under
    the held-out null of this small panel even when all 48 queries are answered as the key
    says, so it can never reach 1e-9."""
    return derive_output_key(bm.host(), *bm.owner_data(), bm.panel(), owner=OWNER,
                             n_queries=QUERIES, n_sets=1, recipes=bm.RECIPES)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("endpoint-verdicts")
    key = output_key()
    # The module verifies one registration more often than Verify's per-registration bucket
    # allows in a few minutes (the limits have their own tests: test_lockouts, test_load):
    # lifted, so the order of its tests cannot turn an expected refusal into RATE_LIMITED.
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                          endpoint_allow=("127.0.0.1",), verify_rate_principal=UNLIMITED,
                          verify_rate_registration=UNLIMITED)
    running = create_server(config)
    tokens = add_principals(config.database, [(OWNER, "owner"), ("arbiter", "arbiter"),
                                              (THIEF, "owner"), (BOB, "owner")])
    try:
        host = _program(bm.host(), folder / "host.pt2")
        references = [_program(m, folder / f"reference{i}.pt2") for i, m in enumerate(bm.panel())]
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens[OWNER],
                              timeout=600) as client:
            receipt = client.register_output_key(key, host, references=references)
            public_key = client.public_key()
        served = [
            ServedModel("copy-labels", export_onnx(_thief_copy(), folder / "copy.onnx", SHAPE),
                        SHAPE, 10, "labels"),
            ServedModel("copy-scores", folder / "copy.onnx", SHAPE, 10, "scores"),
            ServedModel("independent", export_onnx(bm.independents()[0],
                                                   folder / "independent.onnx", SHAPE),
                        SHAPE, 10, "labels"),
        ]
        with serve(served, folder / "oip") as oip:
            yield World(folder, running, tokens, receipt.registration_id, receipt.query_sets,
                        oip, public_key)
    finally:
        running.stop(0)


def test_the_receipt_commits_to_every_query_set(world: World) -> None:
    key = output_key()
    assert world.query_sets == query_set_commitments(key)
    assert len(world.query_sets) == key.n_sets == 1


def _checked(world: World, verdict: AnyEndpointVerdict) -> None:
    """The verdict verifies offline, before and after a round trip through its JSON file,
    and binds the set it names."""
    print(f"\n{verdict.model_name} ({verdict.answers}): {verdict.outcome}, "
          + ", ".join(f"{t.name} {t.statistic:g}/{t.n} log10 p {t.log10_p_value:.1f}"
                      for t in getattr(verdict, "tests", ()))
          + f"; {sum(e.inputs for e in verdict.exchanges)} inputs in "
          f"{(verdict.finished_at - verdict.started_at) / 1e6:.2f} s")
    verify_receipt(verdict, world.public_key)
    path = world.folder / f"verdict-{verdict.log_index}.json"
    save_statement(path, verdict)
    again = load_statement(path)
    assert type(again) is type(verdict)
    verify_receipt(again, world.public_key)
    assert verdict.query_set_commitment == world.query_sets[verdict.query_set]
    key = output_key()
    q, _ = set_items(key, verdict.query_set)
    assert verdict.query_set_commitment == query_set_commitment(key.queries[q])
    assert verdict.n_bits == len(q)
    assert sum(e.inputs for e in verdict.exchanges) >= len(q)
    assert verdict.started_at <= verdict.finished_at <= verdict.integrated_time


def test_a_finetuned_copy_is_a_signed_match_from_labels_and_from_scores(world: World) -> None:
    size = world.tree_size()
    labels = world.verify(OWNER, world.oip.url, "copy-labels")
    assert labels.outcome == "match" and labels.p_value <= 1e-9, labels.tests
    assert labels.answers == "labels" and [t.name for t in labels.tests] == ["labels"]
    assert (labels.model_name, labels.endpoint) == ("copy-labels", world.oip.url)
    assert labels.endpoint_address == "127.0.0.1"
    _checked(world, labels)

    scores = world.verify(OWNER, world.oip.url, "copy-scores")
    assert scores.outcome == "match" and scores.p_value <= 1e-9, scores.tests
    assert scores.answers == "scores"
    assert [t.name for t in scores.tests] == ["labels", "scores", "ranking"]
    _checked(world, scores)
    # The first verification got a set no endpoint had seen; the key holds one set, so the
    # second reuses it (the least-disclosed) and says so: one endpoint (this MLServer's base
    # URL) had seen it. Which set goes where with several is `choose_set`'s unit test.
    assert not labels.set_reused and labels.set_disclosures == 0
    assert scores.set_reused and scores.set_disclosures == 1
    assert world.tree_size() == size + 2

    # Read as labels only, a scores endpoint still matches.
    only = world.verify(OWNER, world.oip.url, "copy-scores", labels_only=True)
    assert only.outcome == "match" and only.answers == "labels"
    assert [t.name for t in only.tests] == ["labels"]
    _checked(world, only)


def test_an_arbiter_gets_the_coarse_endpoint_verdict(world: World) -> None:
    """Under the default coarse policy an arbiter's VerifyEndpoint is signed as a
    `CoarseEndpointVerdict`, as a file Verify is: the decision and the p-value's bucket, the
    conversation bound in full, no count or per-test statistic; the owner's is full."""
    size = world.tree_size()
    coarse = world.verify("arbiter", world.oip.url, "copy-labels")
    assert isinstance(coarse, CoarseEndpointVerdict)
    assert coarse.outcome == "match" and coarse.requested_by == "arbiter"
    assert coarse.p_value_above < coarse.p_value <= 1e-9
    assert coarse.p_value in COARSE_EDGES
    body = json.loads(coarse.statement.body)
    assert body["kind"] == "freemark/v1/coarse-endpoint-verdict"
    assert not {"matches", "ber", "tests", "p_value_method"} & set(body)
    _checked(world, coarse)
    assert world.tree_size() == size + 1


def test_a_held_out_independent_model_is_a_signed_no_match(world: World) -> None:
    verdict = world.verify(OWNER, world.oip.url, "independent")
    assert verdict.outcome == "no_match" and verdict.p_value >= 1e-3, verdict.tests
    _checked(world, verdict)


def _digits_endpoint(answer: Any) -> Any:
    """A scripted digits endpoint: the metadata of a labels model of the digits' shape, and
    `answer(handler, seen, request)` for every infer."""

    def script(handler: Handler, seen: Seen) -> None:
        if seen.method == "GET":
            handler.send_json(seen, DIGITS_META)
            return
        answer(handler, seen, json.loads(seen.body))

    return script


def _redirect(handler: Handler, seen: Seen, request: dict[str, Any]) -> None:
    handler.send_body(seen, b"", 307, {"Location": "http://169.254.169.254/v2/models/m/infer"})


def _gigabyte(handler: Handler, seen: Seen, request: dict[str, Any]) -> None:
    seen.answered = b""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(2**30))
    handler.end_headers()


def _malformed(handler: Handler, seen: Seen, request: dict[str, Any]) -> None:
    handler.send_body(seen, b'{"model_name": "m", "outputs": [')


def _inconsistent(handler: Handler, seen: Seen, request: dict[str, Any]) -> None:
    x = request_inputs(request)
    labels = np.random.default_rng().integers(0, 10, size=len(x)).astype(np.int64)
    handler.send_json(seen, infer_reply(request, labels, "labels"))


def _silent(handler: Handler, seen: Seen, request: dict[str, Any]) -> None:
    handler.server.stop.wait(60)


@pytest.mark.parametrize("answer,reason,status", [
    (_redirect, "ENDPOINT_NOT_ALLOWED", grpc.StatusCode.PERMISSION_DENIED),
    (_gigabyte, "ENDPOINT_INVALID", grpc.StatusCode.FAILED_PRECONDITION),
    (_malformed, "ENDPOINT_INVALID", grpc.StatusCode.FAILED_PRECONDITION),
    (_inconsistent, "ENDPOINT_INVALID", grpc.StatusCode.FAILED_PRECONDITION),
    (_silent, "ENDPOINT_DEADLINE", grpc.StatusCode.DEADLINE_EXCEEDED),
], ids=["redirect", "gigabyte", "malformed", "inconsistent", "never-answers"])
def test_a_hostile_endpoint_is_refused_and_nothing_is_signed(
        world: World, answer: Any, reason: str, status: grpc.StatusCode) -> None:
    size = world.tree_size()
    with endpoint(_digits_endpoint(answer)) as server, pytest.raises(ServerError) as caught:
        world.verify(OWNER, server.url, "m")
    assert (caught.value.reason, caught.value.code) == (reason, status), str(caught.value)
    assert server.url in caught.value.message  # the message names the endpoint
    assert world.tree_size() == size  # no verdict signed, no log entry


def test_an_endpoint_outside_the_allow_list_is_never_contacted(world: World) -> None:
    size = world.tree_size()
    with endpoint(_digits_endpoint(_malformed)) as server:
        with pytest.raises(ServerError) as caught:
            world.verify(OWNER, f"http://127.0.0.2:{server.port}", "m")
        assert server.seen == []
    assert caught.value.reason == "ENDPOINT_NOT_ALLOWED"
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "127.0.0.2" in caught.value.message
    assert world.tree_size() == size


def test_a_model_file_is_judged_on_the_output_key_in_the_sandbox(world: World) -> None:
    """Verify of an uploaded .pt2 against an output-key registration (issue 19, item 4): the
    sandbox reads the file's answers to every set's queries, and the verdict is signed and
    logged with the three output tests, checked offline; no set is disclosed by it. Any
    other format is refused before the upload is read."""
    thief = _program(_thief_copy(), world.folder / "thief-file.pt2")
    disclosed = world.running.ctx.store.disclosures(world.registration_id)
    size = world.tree_size()
    with world.client(OWNER) as client:
        verdict = client.verify(world.registration_id, thief)
        independent = client.verify(world.registration_id, _program(
            bm.independents()[1], world.folder / "independent-file.pt2"))
    assert isinstance(verdict, SignedVerdict)
    print(f"\nfile verdicts: thief {verdict.outcome} "
          + ", ".join(f"{t.name} {t.statistic:g}/{t.n} {t.log10_p_value:.1f}"
                      for t in verdict.tests)
          + f"; independent {independent.outcome} {independent.log10_p_value:.1f}")
    assert verdict.outcome == "match" and verdict.p_value <= 1e-9, verdict.tests
    assert [t.name for t in verdict.tests] == ["labels", "scores", "ranking"]
    assert verdict.n_bits == len(output_key().queries)  # every set: nothing is disclosed
    assert verdict.reading.tensor == "(outputs)" and verdict.reading.located == "named"
    assert verdict.panel.size == len(output_key().panel)
    assert independent.outcome == "no_match" and independent.p_value >= 1e-3
    verify_receipt(verdict, world.public_key)
    verify_suspect(verdict, thief)
    assert world.tree_size() == size + 2
    assert world.running.ctx.store.disclosures(world.registration_id) == disclosed

    onnx = export_onnx(bm.independents()[1], world.folder / "independent-file.onnx", SHAPE)
    with world.client(OWNER) as client, pytest.raises(ServerError) as caught:
        client.verify(world.registration_id, onnx)
    assert caught.value.reason == "MALFORMED_REQUEST"
    assert ".pt2" in caught.value.message and "--endpoint" in caught.value.message
    assert world.tree_size() == size + 2


def test_an_output_key_registers_only_on_its_own_unclaimed_host(world: World) -> None:
    """Another model than the key's host is HOST_MISMATCH; the host again is the owner's own
    earlier registration (the same-weights check of white-box keys); nothing is logged."""
    size = world.tree_size()
    references = sorted(world.folder.glob("reference*.pt2"))
    with world.client(OWNER) as client:
        with pytest.raises(ServerError) as caught:
            client.register_output_key(output_key(), _program(_thief_copy(), world.folder /
                                                              "thief.pt2"), references=references)
        assert caught.value.reason == "HOST_MISMATCH", str(caught.value)
        with pytest.raises(ServerError) as caught:
            client.register_output_key(output_key(), world.folder / "host.pt2",
                                       references=references)
        assert caught.value.reason == "ALREADY_CLAIMED"
        assert world.registration_id in caught.value.message
    assert world.tree_size() == size


def test_through_the_cli_an_owner_checks_an_endpoint_then_gets_a_verdict_checked_offline(
        world: World) -> None:
    """`freemark extract --key OUTKEY --endpoint URL` (no key server), `freemark verify
    --endpoint --json` and `freemark receipt verify` on the file it wrote."""
    passphrase = "correct horse battery"
    key_path = world.folder / "alice.outkey"
    save_output_key(key_path, output_key(), passphrase.encode())
    env = cli_env(FREEMARK_KEY_PASSPHRASE=passphrase,
                  FREEMARK_SERVER=f"127.0.0.1:{world.running.port}",
                  FREEMARK_TOKEN=world.tokens[OWNER])
    size = world.tree_size()
    own = json_out(run_cli("freemark.cli", "extract", "--key", str(key_path), "--endpoint",
                           f"{world.oip.url}/v2/models/copy-labels", "--json", env=env))
    assert own["outcome"] == "match" and own["model_name"] == "copy-labels"
    assert world.tree_size() == size  # the owner's own check logs nothing
    signed = run_cli("freemark.cli", "verify", "--registration", world.registration_id,
                     "--endpoint", world.oip.url, "--endpoint-model", "independent", "--json",
                     "--insecure", env=env)
    verdict_path = world.folder / "cli-verdict.json"
    verdict_path.write_text(signed.stdout)
    assert json_out(signed)["outcome"] == "no_match"
    pem = world.folder / "ttp.pem"
    pem.write_bytes(world.public_key)
    checked = json_out(run_cli("freemark.cli", "receipt", "verify", str(verdict_path),
                               "--public-key", str(pem), "--json", env=env))
    assert checked["ok"] is True and checked["kind"] == "endpoint verdict"
    assert world.tree_size() == size + 1


def _white_box_register(world: World, who: str, model: nn.Module, name: str) -> Receipt:
    bundle = derive_key(model, layer="act", owner=who,
                        triggers=select_triggers(*bm.owner_data(), per_class=10, seed=3))
    with KeyServiceClient(f"127.0.0.1:{world.running.port}", token=world.tokens[who],
                          timeout=600) as client:
        return client.register(bundle, _program(model, world.folder / f"{name}.pt2"))


def test_a_copy_of_an_output_key_host_cannot_be_registered_under_either_key_kind(
        world: World) -> None:
    """Issue 19: an output key's host is held by more than its fingerprint. Mallory's
    fine-tuned copy (other weights) is refused as a prior claim when she registers it with a
    white-box key of her own, and when she registers it with an output key of her own: the
    key server reads the copy's answers to Alice's queries in its sandbox and her key
    matches. The refusal names neither Alice's registration nor any figure; nothing is
    logged. Bob's independent model registers (no false claim)."""
    size = world.tree_size()
    copy_model = _thief_copy()
    with pytest.raises(ServerError) as caught:
        _white_box_register(world, THIEF, copy_model, "mallory-white-box")
    assert caught.value.reason == "ALREADY_CLAIMED", str(caught.value)
    assert caught.value.message.endswith(CLAIMED)  # the fixed text: no id, no figure
    assert "reg_" not in caught.value.message and "log10" not in caught.value.message

    key = derive_output_key(copy_model, *bm.owner_data(), bm.panel(), owner=THIEF,
                            n_queries=16, n_sets=1, recipes=bm.RECIPES)
    references = sorted(world.folder.glob("reference*.pt2"))
    with KeyServiceClient(f"127.0.0.1:{world.running.port}", token=world.tokens[THIEF],
                          timeout=600) as client, pytest.raises(ServerError) as caught:
        client.register_output_key(key, _program(copy_model, world.folder / "mallory.pt2"),
                                   references=references)
    assert caught.value.reason == "ALREADY_CLAIMED", str(caught.value)
    assert caught.value.message.endswith(CLAIMED) and "reg_" not in caught.value.message
    assert world.tree_size() == size

    receipt = _white_box_register(world, BOB, bm.independents()[1], "bob")
    assert receipt.owner == BOB and world.tree_size() == size + 1
