"""Hugging Face checkpoints and ONNX suspects end to end, over a real key server (issue 10).

The owner's path is the command line: text triggers from the checkpoint's own tokenizer,
a key derived on the checkpoint directory, the directory registered (packed into one file
on the wire) for a receipt. The verdicts come from the sandbox, on a fine-tuned copy (as a
directory, as ONNX and as bare weights), the host as ONNX, and an independently initialised
model; the fine-tuned copy cannot be registered by someone else. Hostile
uploads (a pickled checkpoint, a config asking for remote code, an ONNX graph with a
custom-domain node) are refused with INVALID_ARGUMENT and leave no log entry and no
registration.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

import hostile_models
from freemark.errors import InvalidModelError
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import load_bundle, to_proto
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from hf_fixtures import KEY_LAYER, Checkpoints, build_checkpoints
from ttp_fixtures import cli_env, json_out, run_cli

CLIENT = "freemark.cli"
CHUNK = 1 << 20


@dataclass
class World:
    """A running key server, its principals, the checkpoints and the owner's registration."""

    running: RunningServer
    tokens: dict[str, str]
    files: Checkpoints
    key: Path
    receipt: dict[str, object]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(self.address, token=self.tokens[who], timeout=300)

    def env(self, who: str) -> dict[str, str]:
        return cli_env(FREEMARK_SERVER=self.address, FREEMARK_TOKEN=self.tokens[who])

    def state(self) -> tuple[int, int]:
        """(log size, registrations): what a refusal must leave unchanged."""
        store = self.running.ctx.store
        return store.tree_size(), len(store.list_registrations(None, 100, "")[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("hf")
    files = build_checkpoints(folder)
    running = create_server(ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                                         grace_seconds=5))
    tokens = {}
    for name, role in (("alice", "owner"), ("bob", "owner"), ("judge", "arbiter")):
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    world = World(running, tokens, files, folder / "alice.fmk", {})

    triggers = folder / "triggers.npz"
    made = json_out(run_cli(CLIENT, "triggers", "--text", str(files.sentences), "--tokenizer",
                            str(files.host), "--max-length", "16", "--per-class", "4",
                            "--out", str(triggers), "--json"))
    assert made["n_triggers"] == 16 and made["classes"] == 4
    keygen = json_out(run_cli(CLIENT, "keygen", "--model", str(files.host), "--layer", KEY_LAYER,
                              "--triggers", str(triggers), "--owner", "alice", "--out",
                              str(world.key), "--json"))
    assert keygen["host_ber"] == 0.0 and keygen["units"] == 1536
    world.receipt = json_out(run_cli(CLIENT, "register", "--key", str(world.key), "--model",
                                     str(files.host), "--json", env=world.env("alice")))
    yield world
    running.stop(grace=1)


def test_a_checkpoint_directory_registers_and_its_copies_match(world: World) -> None:
    receipt = world.receipt
    assert receipt["layer"] == KEY_LAYER and receipt["owner"] == "alice"
    registration = str(receipt["registration_id"])
    stolen = json_out(run_cli(CLIENT, "verify", "--registration", registration, "--model",
                              str(world.files.stolen), "--json", env=world.env("judge")))
    assert stolen["outcome"] == "match" and float(stolen["p_value"]) <= 1e-9
    assert stolen["signature"] and stolen["requested_by"] == "judge"
    with world.client("judge") as judge:
        pem = judge.public_key()
    folder = world.key.parent
    (folder / "ttp.pem").write_bytes(pem)
    (folder / "stolen.json").write_text(json.dumps(stolen))
    checked = run_cli(CLIENT, "receipt", "verify", str(folder / "stolen.json"), "--public-key",
                      str(folder / "ttp.pem"), "--model", str(world.files.stolen))
    assert checked.returncode == 0  # the verdict is about that directory, as packed
    with world.client("judge") as judge:  # an arbiter: coarse verdicts by default
        innocent = judge.verify(registration, world.files.independent)
        stolen_onnx = judge.verify(registration, world.files.stolen_onnx)
    with world.client("alice") as alice:  # the owner: the full verdict
        as_onnx = alice.verify(registration, world.files.host_onnx)
    assert innocent.outcome == "no_match" and innocent.p_value >= 1e-3
    for verdict in (as_onnx, stolen_onnx):
        assert verdict.outcome == "match" and verdict.p_value <= 1e-9
    assert as_onnx.matches == as_onnx.n_bits  # the host, converted: every bit
    onnx_sha = hashlib.sha256(world.files.stolen_onnx.read_bytes()).digest()
    assert stolen_onnx.suspect_sha256 == onnx_sha


def test_weights_only_suspects_and_copies_registered_by_someone_else(world: World) -> None:
    """A thief's bare model.safetensors is read with the registered checkpoint's config; the
    thief registering the fine-tuned copy under his own key is refused as claimed."""
    from freemark.derive import derive_key
    from freemark.errors import AlreadyRegisteredError
    from freemark.formats.huggingface import load_checkpoint

    registration = str(world.receipt["registration_id"])
    with world.client("alice") as alice:
        weights = alice.verify(registration, world.files.stolen / "model.safetensors",
                               fmt="safetensors")
    assert weights.outcome == "match" and weights.p_value <= 1e-9
    bob_key = derive_key(load_checkpoint(world.files.stolen), layer=KEY_LAYER, owner="bob",
                         triggers=load_bundle(world.key).triggers)
    before = world.state()
    with world.client("bob") as bob, pytest.raises(AlreadyRegisteredError) as refused:
        bob.register(bob_key, world.files.stolen)
    assert "reg_" not in str(refused.value)  # names no earlier registration
    assert world.state() == before


KEY_TENSOR = "/bert/encoder/layer.1/intermediate/intermediate_act_fn/Mul_1_output_0"
# Another tensor of the key layer's width: the first layer's GELU output.
OTHER_TENSOR = "/bert/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0"


def test_the_arbiter_can_name_the_onnx_tensor(world: World) -> None:
    registration = str(world.receipt["registration_id"])
    name = KEY_TENSOR
    with world.client("judge") as judge:
        named = judge.verify(registration, world.files.stolen_onnx, onnx_tensor=name)
        assert named.outcome == "match"
        assert named.reading.requested == name and named.reading.located == "scan"
        with pytest.raises(InvalidModelError) as wrong:
            judge.verify(registration, world.files.stolen_onnx, onnx_tensor="no_such_tensor")
    assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_such_tensor" in str(wrong.value)


def test_the_key_server_not_the_file_or_the_requester_locates_the_onnx_key_tensor(
        world: World, tmp_path: Path) -> None:
    """Issue 18, item 3. On main the TTP read the tensor the requester named, or the one the
    suspect's own node names put in the key layer's scope, and signed a `no_match` on it
    without saying which. Now it judges every candidate tensor (every tensor computed from
    the inputs of the key layer's width), signs the strongest corrected for
    how many there were, and names it and how it was located:

    - the stolen export with another tensor of the right width requested: a match, read on
      the layer-1 tensor, the requested one only one of the candidates;
    - a thief's file with every node and tensor renamed and a decoy ReLU named like the key
      layer, no tensor requested: a match, not on the decoy;
    - an independent model's export: still `no_match` at a p-value far from alpha.
    Every verdict passes `receipt verify --model` against its file, which checks offline
    that the file computes the tensors the verdict names."""
    from freemark.formats.huggingface import load_checkpoint
    from freemark.records.wire import verdict_to_json
    from hf_fixtures import export_onnx

    registration = str(world.receipt["registration_id"])
    decoy, original = hostile_models.renamed_with_decoy(
        world.files.stolen_onnx, tmp_path / "decoy.onnx", layer=KEY_LAYER, under=OTHER_TENSOR)
    ids = torch.randint(100, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    independent = export_onnx(load_checkpoint(world.files.independent),
                              tmp_path / "independent.onnx", (ids, torch.ones_like(ids)))
    with world.client("judge") as judge:
        requested = judge.verify(registration, world.files.stolen_onnx, onnx_tensor=OTHER_TENSOR)
        decoyed = judge.verify(registration, decoy)
        innocent = judge.verify(registration, independent)
    with world.client("alice") as alice:
        full = alice.verify(registration, decoy)

    assert requested.outcome == "match" and requested.p_value <= 1e-20
    assert requested.reading.located == "scan" and requested.reading.requested == OTHER_TENSOR
    assert requested.reading.tensor.startswith("/bert/encoder/layer.1/intermediate/")
    assert requested.reading.candidates >= 2
    for verdict in (decoyed, full):
        assert verdict.outcome == "match" and verdict.p_value <= 1e-20
        assert verdict.reading.located == "scan" and verdict.reading.requested == ""
        assert verdict.reading.tensor != "decoy"
        assert original[verdict.reading.tensor].startswith("/bert/encoder/layer.1/intermediate/")
    assert full.p_value_method.startswith(f"the strongest of {full.reading.candidates} "
                                          "candidate tensors")
    strongest = min(t.log10_p_value for t in full.tests)  # the correction is in the p-value
    assert full.log10_p_value == pytest.approx(strongest + math.log10(full.reading.candidates))
    assert innocent.outcome == "no_match" and innocent.p_value >= 1e-3
    assert innocent.reading.located == "scan" and innocent.reading.candidates >= 1

    folder = world.key.parent
    with world.client("judge") as judge:
        (folder / "ttp.pem").write_bytes(judge.public_key())
    for number, (verdict, path) in enumerate([(requested, world.files.stolen_onnx),
                                              (decoyed, decoy), (full, decoy),
                                              (innocent, independent)]):
        saved = tmp_path / f"verdict{number}.json"
        saved.write_text(json.dumps(verdict_to_json(verdict)))
        checked = run_cli(CLIENT, "receipt", "verify", str(saved), "--public-key",
                          str(folder / "ttp.pem"), "--model", str(path), check=False)
        assert checked.returncode == 0, checked.stderr
        assert verdict.reading.tensor in checked.stdout


def _raw_register(world: World, data: bytes, fmt: int) -> grpc.RpcError:
    """Send a Register stream as a hostile client would, past the CLI's own checks."""
    upload = pb.UploadHeader(total_size=len(data), sha256=hashlib.sha256(data).digest(),
                             format=fmt)

    def stream() -> Iterator[pb.RegisterRequest]:
        yield pb.RegisterRequest(header=pb.RegisterHeader(
            bundle=to_proto(load_bundle(world.key)), upload=upload))
        for start in range(0, len(data), CHUNK):
            yield pb.RegisterRequest(chunk=data[start:start + CHUNK])

    with grpc.insecure_channel(world.address) as channel:
        stub = keyservice_pb2_grpc.KeyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Register(stream(), timeout=300,
                          metadata=[("authorization", f"Bearer {world.tokens['alice']}")])
    return caught.value


def _packed_with_config(world: World, folder: Path, **config: object) -> Path:
    """The host packed with extra config.json entries (what a hostile uploader controls)."""
    from safetensors.torch import load_file, save_file

    values = json.loads((world.files.host / "config.json").read_text()) | config
    path = folder / "hostile.safetensors"
    save_file(load_file(str(world.files.host / "model.safetensors")), str(path),
              metadata={"freemark.hf_config": json.dumps(values)})
    return path


def test_hostile_uploads_are_refused_without_side_effects(world: World, tmp_path: Path) -> None:
    import torch

    from freemark.formats.huggingface import load_checkpoint

    before = world.state()
    pickled = tmp_path / "pytorch_model.bin"
    torch.save(load_checkpoint(world.files.host).state_dict(), pickled)
    refused = _raw_register(world, pickled.read_bytes(), pb.MODEL_FORMAT_HF_CHECKPOINT)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pytorch_model.bin" in (refused.details() or "")

    remote = _packed_with_config(world, tmp_path, auto_map={
        "AutoModelForSequenceClassification": "evil.Model"})
    refused = _raw_register(world, remote.read_bytes(), pb.MODEL_FORMAT_HF_CHECKPOINT)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remote code" in (refused.details() or "")

    huge = _packed_with_config(world, tmp_path, num_hidden_layers=90, hidden_size=8192,
                               intermediate_size=65536, num_attention_heads=64)
    registration = str(world.receipt["registration_id"])
    with world.client("judge") as judge:
        with pytest.raises(InvalidModelError) as caught:
            judge.verify(registration, huge, fmt="hf")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the cap" in str(caught.value)

        custom = tmp_path / "custom.onnx"
        _with_custom_node(world.files.stolen_onnx, custom)
        with pytest.raises(InvalidModelError) as caught:
            judge.verify(registration, custom)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "domain" in str(caught.value)
    assert world.state() == before, "a refusal logged or registered something"


def _with_custom_node(source: Path, out: Path) -> None:
    """The ONNX model with one node of a custom operator domain spliced onto an output."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Exfiltrate", [logits], ["leaked"],
                                             domain="com.evil"))
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    model.graph.output.append(helper.make_empty_tensor_value_info("leaked"))
    onnx.save(model, str(out))
