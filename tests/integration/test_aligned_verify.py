"""Structural obfuscation through a real key server (issue 9): relabelled, rescaled and padded
copies are signed matches once the registration has a reference panel, and held-out
independent models are not.

For each lab task (the digits CNN through the real sandbox; the MNIST CNN through the
sandbox worker's own code in process, to keep the suite's time) the owner registers the host
with a panel of five independently trained models, then an arbiter verifies every attack and
ten (digits) or five (MNIST) further independent models that neither the panel nor any
threshold saw. A thief's relabelled copy cannot be registered under his own key either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import hostile_models
import scheme_models as sm
from freemark.audit.receipt import verify_receipt
from freemark.derive import derive_key
from freemark.errors import AlreadyRegisteredError, InvalidModelError, SandboxLimitError
from freemark.formats.pt2 import save_program
from freemark.records.types import Receipt, SignedVerdict
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.verdict.canon import MAX_ALIGN_UNITS
from freemark_keyserver.config import UNLIMITED, ServerConfig, default_policy
from freemark_keyserver.handlers.panels import add_panel_member
from freemark_keyserver.server import RunningServer, create_server
from freemark_lab.attacks import obfuscate as ob
from ttp_fixtures import json_out, run_cli
from ttp_fleet import add_principals, in_process_batch, in_process_sandbox

ALPHA = 1e-9
NULL_FLOOR = 1e-3
PANEL_SEEDS = range(5)  # the scheme tests train the same independent models (cached)
HELD_OUT = {"digits": range(40, 50), "mnist": range(40, 45)}
REAL_SANDBOX = {"digits": True, "mnist": False}


def attacks(name: str) -> dict[str, nn.Module]:
    """The function-preserving rewrites the issue lists, on the host or its fine-tuned copy."""
    task = sm.task(name).lab
    host, tuned = sm.host(name), sm.finetuned(name)
    everything = ob.permute_units(
        ob.add_dummy_units(
            ob.add_dummy_units(ob.rescale_units(tuned, task, seed=2), task, count=16,
                               mode="zero", seed=3),
            task, count=16, mode="split", seed=4),
        task, seed=5)
    return {
        "permuted": ob.permute_units(host, task, seed=1),
        "permuted+finetuned": ob.permute_units(tuned, task, seed=1),
        "rescaled+permuted": ob.permute_units(ob.rescale_units(host, task, seed=2), task, seed=1),
        "16 zero units": ob.add_dummy_units(host, task, count=16, mode="zero", seed=3),
        "16 split units": ob.add_dummy_units(host, task, count=16, mode="split", seed=4),
        "all at once, fine-tuned": everything,
    }


@dataclass
class Deployment:
    """A running key server with one registration that has a five-model panel."""

    name: str
    folder: Path
    running: RunningServer
    tokens: dict[str, str]
    bundle: KeyBundle
    receipt: Receipt
    example: tuple[torch.Tensor, ...]

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=600)

    def export(self, label: str, model: nn.Module) -> Path:
        path = self.folder / f"{label.replace(' ', '_').replace(',', '')}.pt2"
        save_program(model, self.example, path)
        return path

    def verify(self, label: str, model: nn.Module) -> SignedVerdict:
        with self.client("judge") as client:
            return client.verify(self.receipt.registration_id, self.export(label, model))


# The tests of the aligned test's evidence run on both tasks; those of a mechanism of the key
# server (ONNX scans, the width cap, prior claims, the panel's rules) on the digits CNN only,
# through the real sandbox: on MNIST they would repeat it in the in-process sandbox.
DIGITS_ONLY = pytest.mark.parametrize("deployment", ["digits"], indirect=True)


@pytest.fixture(scope="module", params=["digits", "mnist"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    name = request.param
    folder = tmp_path_factory.mktemp(f"aligned-{name}")
    # The judge reads every test's statistics here: a server that discloses them to arbiters.
    # It also verifies every attack against one registration and registers many times: the
    # rate limits are lifted.
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                          verdict_policy=default_policy("full"), verify_rate_principal=UNLIMITED,
                          verify_rate_registration=UNLIMITED, register_rate_principal=UNLIMITED)
    running = create_server(config)
    if not REAL_SANDBOX[name]:
        running.ctx.sandbox, running.ctx.batch = in_process_sandbox, in_process_batch
    tokens = add_principals(config.database, [("alice", "owner"), ("mallory", "owner"),
                                              ("judge", "arbiter")])
    task = sm.task(name)
    example = task.lab.sample_inputs(2)
    host = sm.host(name)
    bundle = derive_key(host, layer="act", triggers=task.lab.triggers(10, 0), owner="alice")
    deployment = Deployment(name, folder, running, tokens, bundle, None, example)  # type: ignore[arg-type]
    references = [deployment.export(f"reference{seed}", sm.independent(name, seed))
                  for seed in PANEL_SEEDS]
    with deployment.client("alice") as client:
        deployment.receipt = client.register(bundle, deployment.export("host", host),
                                             references=references)
    try:
        yield deployment
    finally:
        running.stop(0)


def test_the_receipt_signs_the_panel(deployment: Deployment) -> None:
    assert deployment.receipt.panel.size == len(PANEL_SEEDS)
    with deployment.client("alice") as client:
        verify_receipt(deployment.receipt, client.public_key())


def test_every_obfuscated_copy_is_a_signed_match(deployment: Deployment) -> None:
    rows = []
    for label, model in attacks(deployment.name).items():
        verdict = deployment.verify(label, model)
        tests = {t.name: t for t in verdict.tests}
        rows.append((label, verdict.outcome, verdict.log10_p_value, tests["plain"].log10_p_value,
                     tests["aligned"].statistic, tests["aligned"].n))
        assert verdict.outcome == "match" and verdict.is_match, (label, verdict.p_value_method)
        assert verdict.p_value <= ALPHA and verdict.alpha == ALPHA
        assert verdict.panel == deployment.receipt.panel
        with deployment.client("judge") as client:
            verify_receipt(verdict, client.public_key())
    print(f"\n{deployment.name}: attack, outcome, log10 p (combined, plain), aligned units")
    for row in rows:
        print("  {:26s} {:8s} {:7.1f} {:7.1f} {:5.0f}/{:.0f}".format(*row))


def test_held_out_independent_models_are_no_match_under_every_test(deployment: Deployment) -> None:
    rows = []
    for seed in HELD_OUT[deployment.name]:
        verdict = deployment.verify(f"independent{seed}", sm.independent(deployment.name, seed))
        tests = {t.name: t for t in verdict.tests}
        rows.append((seed, verdict.log10_p_value, tests["plain"].log10_p_value,
                     tests["aligned"].log10_p_value, tests["aligned"].statistic))
        assert verdict.outcome == "no_match", (seed, verdict.p_value_method)
        for p in (verdict.p_value, tests["plain"].p_value, tests["aligned"].p_value):
            assert p >= NULL_FLOOR, (seed, verdict.p_value_method)
    print(f"\n{deployment.name}: held-out seed, log10 p (combined, plain, aligned), aligned units")
    for row in rows:
        print("  {:3d} {:6.2f} {:6.2f} {:6.2f} {:4.0f}".format(*row))


def _onnx(deployment: Deployment, label: str, model: nn.Module) -> Path:
    path = deployment.folder / f"{label}.onnx"
    torch.onnx.export(model.eval(), deployment.example, str(path), dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


@DIGITS_ONLY
def test_an_onnx_suspect_is_scanned_by_the_key_server_not_read_by_its_names(
        deployment: Deployment) -> None:
    """Issue 18, item 3, where the panel lets the aligned test run (a scan then reads tensors
    of any width): the fine-tuned, relabelled, rescaled and padded copy exported to ONNX,
    with the flattened conv features requested, is a signed match read on another tensor;
    the same file renamed, with a decoy ReLU named like the key layer over the flattened
    features and nothing requested, is a signed match too, not on the decoy; held-out
    independent models' exports stay `no_match` at p >= 1e-3 however many tensors were
    scanned."""
    import onnx

    copy = _onnx(deployment, "laundered", attacks(deployment.name)["all at once, fine-tuned"])
    flat = next(n.output[0] for n in onnx.load(str(copy)).graph.node if n.op_type == "Flatten")
    decoy, _ = hostile_models.renamed_with_decoy(copy, deployment.folder / "decoy.onnx",
                                                 layer="act", under=flat)
    with deployment.client("judge") as client:
        requested = client.verify(deployment.receipt.registration_id, copy, onnx_tensor=flat)
        decoyed = client.verify(deployment.receipt.registration_id, decoy)
        innocent = [client.verify(deployment.receipt.registration_id,
                                  _onnx(deployment, f"independent{seed}",
                                        sm.independent(deployment.name, seed)))
                    for seed in list(HELD_OUT[deployment.name])[:3]]
    for verdict, asked in ((requested, flat), (decoyed, "")):
        assert verdict.outcome == "match" and verdict.p_value <= 1e-20, verdict.p_value_method
        assert verdict.reading.located == "scan" and verdict.reading.requested == asked
        assert verdict.reading.tensor not in (flat, "decoy") and verdict.reading.candidates >= 3
        assert {t.name for t in verdict.tests} == {"plain", "aligned"}
    for verdict in innocent:
        assert verdict.outcome == "no_match" and verdict.p_value >= NULL_FLOOR, \
            verdict.p_value_method
    print(f"\n{deployment.name} ONNX: " + ", ".join(
        f"{v.outcome} log10 p {v.log10_p_value:.1f} of {v.reading.candidates}"
        for v in (requested, decoyed, *innocent)))


@DIGITS_ONLY
def test_a_key_layer_widened_past_the_alignment_cap_is_refused_not_cleared(
        deployment: Deployment) -> None:
    """A scan skips tensors the key cannot be read on; a key layer padded with never-firing
    units past the aligned test's width cap must not be one of them (the scan would then
    sign a `no_match` on the decoys left). The copy is refused RESOURCE_EXHAUSTED, by its
    shape alone, and nothing is logged."""
    task = sm.task(deployment.name).lab
    widened = ob.add_dummy_units(ob.permute_units(sm.host(deployment.name), task, seed=1), task,
                                 count=MAX_ALIGN_UNITS, mode="zero", seed=3)
    path = _onnx(deployment, "widened", widened)
    size = deployment.running.ctx.store.tree_size()
    with deployment.client("judge") as client, pytest.raises(SandboxLimitError,
                                                              match="aligned test") as refused:
        client.verify(deployment.receipt.registration_id, path)
    assert f"{MAX_ALIGN_UNITS:,}" in str(refused.value)
    assert deployment.running.ctx.store.tree_size() == size


@DIGITS_ONLY
def test_a_relabelled_copy_cannot_be_registered_under_another_key(deployment: Deployment) -> None:
    task = sm.task(deployment.name)
    stolen = ob.permute_units(ob.rescale_units(sm.host(deployment.name), task.lab, seed=9),
                              task.lab, seed=9)
    bundle = derive_key(stolen, layer="act", triggers=task.lab.triggers(10, 5), owner="mallory")
    with deployment.client("mallory") as client, pytest.raises(AlreadyRegisteredError) as caught:
        client.register(bundle, deployment.export("laundered", stolen))
    message = str(caught.value)
    assert "reg_" not in message and "p=" not in message and not any(c.isdigit() for c in message)


@DIGITS_ONLY
def test_a_reference_that_is_the_host_relabelled_is_refused(deployment: Deployment) -> None:
    task = sm.task(deployment.name)
    other = sm.independent(deployment.name, 30)
    bundle = derive_key(other, layer="act", triggers=task.lab.triggers(10, 1), owner="mallory")
    references = [deployment.export("ref-a", sm.independent(deployment.name, 31)),
                  deployment.export("ref-copy", ob.permute_units(other, task.lab, seed=4))]
    with deployment.client("mallory") as client, pytest.raises(InvalidModelError, match="copy"):
        client.register(bundle, deployment.export("other-host", other), references=references)
    with deployment.client("mallory") as client:
        assert not [r for r in client.list_registrations() if r.owner == "mallory"]


@DIGITS_ONLY
def test_an_operator_panel_joins_later_registrations_of_the_family(deployment: Deployment
                                                                   ) -> None:
    """`freemark-keyserver panel add` (a real CLI process, the real sandbox) gives a later
    owner who brought no references of his own an aligned test: his relabelled copy matches.
    The first member goes through the CLI; the other two through the function it calls, on
    the running server's warm sandbox (a CLI process starts its own: suite time)."""
    data_dir = str(deployment.running.ctx.config.data_dir)
    like = deployment.receipt.registration_id
    paths = [deployment.export(f"operator{seed}", sm.independent(deployment.name, seed))
             for seed in list(PANEL_SEEDS)[:3]]
    added = [json_out(run_cli("freemark_keyserver.cli", "panel", "add", "--data-dir", data_dir,
                              "--model", str(paths[0]), "--like", like, "--json"))]
    added += [{"member_id": add_panel_member(deployment.running.ctx, path, like=like, label="",
                                             now=time.time_ns() // 1000).member_id}
              for path in paths[1:]]
    listed = deployment.running.ctx.store.panel_members(active=True)
    assert {m.member_id for m in listed} == {m["member_id"] for m in added}

    task = sm.task(deployment.name)
    carol_host = sm.independent(deployment.name, 31)
    bundle = derive_key(carol_host, layer="act", triggers=task.lab.triggers(10, 2), owner="carol")
    tokens = add_principals(deployment.running.ctx.config.database, [("carol", "owner")])
    deployment.tokens.update(tokens)
    with deployment.client("carol") as client:
        receipt = client.register(bundle, deployment.export("carol-host", carol_host))
    assert receipt.panel.size == 3
    with deployment.client("judge") as client:
        verdict = client.verify(receipt.registration_id, deployment.export(
            "carol-permuted", ob.permute_units(carol_host, task.lab, seed=8)))
    assert verdict.outcome == "match" and verdict.panel == receipt.panel
    assert [t.name for t in verdict.tests] == ["plain", "aligned"]

    removed = run_cli("freemark_keyserver.cli", "panel", "remove", "--data-dir", data_dir,
                      str(added[0]["member_id"]), "--json")
    assert json_out(removed) == {"removed": added[0]["member_id"]}
    left = json_out(run_cli("freemark_keyserver.cli", "panel", "list", "--data-dir", data_dir,
                            "--json"))
    assert len(left["members"]) == 2
