"""LoRA fine-tunes as suspects, over a real key server and its sandbox (issue 20, part C).

The owner registers the decoder host (`decoder_fixtures`: a Llama-family model trained here
on real text) through the command line. A thief trains a LoRA adapter on it with peft, a
little, on another text (`lora_fixtures`), and ships it merged (a checkpoint directory) or
unmerged (the adapter directory, with the host as its base): both are signed matches at
p ≤ 1e-9, the unmerged one through `freemark verify --model BASE --adapter ADAPTER`, which
packs the pair into one upload that the sandbox child vets and merges, and whose verdict
`receipt verify --model BASE --adapter ADAPTER` checks offline. An adapter trained the same
way on an independently trained decoder is `no_match`.
Hostile packed adapters (pointing elsewhere for their base, an absurd rank, tensors that
do not fit) are refused with INVALID_ARGUMENT, log nothing, and leave the server SERVING.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decoder_fixtures import KEY_LAYER, Decoders, decoders
from freemark.errors import InvalidModelError
from freemark.formats import lora
from freemark.rpc import KeyServiceClient
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import cli_env, json_out, run_cli

pytest.importorskip("peft")
from lora_fixtures import train_adapter  # needs peft

CLIENT = "freemark.cli"


@dataclass
class World:
    """A running key server, its principals, the checkpoints, the thief's LoRA fine-tunes and
    the owner's registration."""

    running: RunningServer
    tokens: dict[str, str]
    files: Decoders
    adapter: Path  # trained on the host: with the host as its base, the stolen model
    merged: Path  # the same adapter merged, saved as a checkpoint
    innocent: Path  # an independently trained decoder, the base of `innocent_adapter`
    innocent_adapter: Path
    registration: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(self.address, token=self.tokens[who], timeout=300)

    def env(self, who: str) -> dict[str, str]:
        return cli_env(FREEMARK_SERVER=self.address, FREEMARK_TOKEN=self.tokens[who])

    def tree_size(self) -> int:
        return self.running.ctx.store.tree_size()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("lora")
    files = decoders()
    innocent = files.independents[0]
    adapter = train_adapter(files.host, folder / "adapter", seed=7, merged=folder / "merged")
    innocent_adapter = train_adapter(innocent, folder / "innocent-adapter", seed=8)
    running = create_server(ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                                         grace_seconds=5))
    tokens = {}
    for name, role in (("alice", "owner"), ("judge", "arbiter")):
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    world = World(running, tokens, files, adapter, folder / "merged", innocent,
                  innocent_adapter, "")
    triggers, key = folder / "triggers.npz", folder / "alice.fmk"
    run_cli(CLIENT, "triggers", "--text", str(files.sentences), "--tokenizer", str(files.host),
            "--max-length", "32", "--count", "32", "--out", str(triggers))
    run_cli(CLIENT, "keygen", "--model", str(files.host), "--layer", KEY_LAYER, "--triggers",
            str(triggers), "--owner", "alice", "--out", str(key))
    receipt = json_out(run_cli(CLIENT, "register", "--key", str(key), "--model",
                               str(files.host), "--json", env=world.env("alice")))
    world.registration = str(receipt["registration_id"])
    yield world
    running.stop(grace=1)


def test_merged_and_unmerged_lora_copies_are_signed_matches(world: World, tmp_path: Path
                                                            ) -> None:
    with world.client("alice") as alice:
        merged = alice.verify(world.registration, world.merged)
        innocent = alice.verify(world.registration, world.innocent,
                                adapter=world.innocent_adapter)
    assert merged.outcome == "match" and merged.p_value <= 1e-9
    assert innocent.outcome == "no_match" and innocent.p_value >= 1e-3

    unmerged = json_out(run_cli(CLIENT, "verify", "--registration", world.registration,
                                "--model", str(world.files.host), "--adapter",
                                str(world.adapter), "--json", env=world.env("alice")))
    assert unmerged["outcome"] == "match" and float(unmerged["p_value"]) <= 1e-9
    with lora.packed_pair(world.files.host, world.adapter) as sent:  # what went on the wire
        assert unmerged["suspect_sha256"] == hashlib.sha256(sent.read_bytes()).hexdigest()
    with world.client("alice") as alice:
        (tmp_path / "ttp.pem").write_bytes(alice.public_key())
    (tmp_path / "verdict.json").write_text(json.dumps(unmerged))
    checked = run_cli(CLIENT, "receipt", "verify", str(tmp_path / "verdict.json"),
                      "--public-key", str(tmp_path / "ttp.pem"), "--model",
                      str(world.files.host), "--adapter", str(world.adapter), check=False)
    assert checked.returncode == 0, checked.stderr
    refused = run_cli(CLIENT, "receipt", "verify", str(tmp_path / "verdict.json"),
                      "--public-key", str(tmp_path / "ttp.pem"), "--model",
                      str(world.innocent), "--adapter", str(world.innocent_adapter),
                      check=False)
    assert refused.returncode != 0  # another adapter is another suspect
    print(f"\nlog10 p: merged {merged.log10_p_value:.1f}, unmerged "
          f"{float(unmerged['log10_p_value']):.1f}, innocent base + adapter "
          f"{innocent.log10_p_value:.2f}")


def _hostile(world: World, folder: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]
             ) -> Path:
    """The thief's packed pair with its configs or tensors edited by hand, past the client's
    own checks (what a hostile uploader controls)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = lora.pack(world.files.host, world.adapter, folder / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        configs = json.loads(handle.metadata()[lora.METADATA_KEY])
    tensors = load_file(str(good))
    edit(configs, tensors)
    out = folder / "hostile.safetensors"
    save_file(tensors, str(out), metadata={lora.METADATA_KEY: json.dumps(configs)})
    return out


def _points_elsewhere(configs: dict[str, Any], _: dict[str, Any]) -> None:
    configs["adapter_config"]["base_model_name_or_path"] = "https://example.invalid/llama-7b"


def _absurd_rank(configs: dict[str, Any], _: dict[str, Any]) -> None:
    configs["adapter_config"]["r"] = 1 << 30


def _extra_tensor(_: dict[str, Any], tensors: dict[str, Any]) -> None:
    import torch

    tensors[lora.ADAPTER_PREFIX + "base_model.model.model.payload"] = torch.zeros(8)


def test_hostile_adapter_uploads_are_refused_without_side_effects(world: World,
                                                                  tmp_path: Path) -> None:
    before = world.tree_size()
    cases = {"points elsewhere": (_points_elsewhere, "never follows it"),
             "absurd rank": (_absurd_rank, "r must be a number"),
             "extra tensor": (_extra_tensor, "unexpected")}
    with world.client("judge") as judge, grpc.insecure_channel(world.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name, (edit, words) in cases.items():
            hostile = _hostile(world, tmp_path, edit)
            with pytest.raises(InvalidModelError) as caught:
                judge.verify(world.registration, hostile)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert words in str(caught.value), name
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
    assert world.tree_size() == before, "a refusal logged something"
