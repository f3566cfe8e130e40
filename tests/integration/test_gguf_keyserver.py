"""GGUF suspects over a real key server and its sandbox (issue 20, part B).

The decoder host of `tests/decoder_fixtures.py` (a small Llama trained here on real text) is
registered with text triggers from its own tokenizer; its GGUF copies, converted as
llama.cpp's converter does, are signed matches through Verify: Q8_0 (through `freemark
verify --model X.gguf`), Q4_K and Q4_K_M (the host's 128-value rows are not whole Q4_K
blocks, so those tensors fall back to Q5_0 as llama-quantize does; whole-block Q4_K is
read in tests/unit/client/formats/test_gguf.py). An independently trained decoder of the
same config, as Q8_0, is no_match. The hostile corpus (`tests/hostile_gguf.py`: header,
count, string and array bombs, misdeclared blocks, an unsupported type, an unsupported
architecture, a GGUF of another family or other sizes than the registration's) is refused
with INVALID_ARGUMENT naming why, signs and logs nothing, and leaves the server SERVING.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hostile_gguf
from decoder_fixtures import KEY_LAYER, RECIPE, decoders, stdlib_text
from freemark.derive import derive_key
from freemark.errors import FreemarkError
from freemark.formats.huggingface import load_checkpoint
from freemark.rpc import KeyServiceClient
from freemark.scheme.text_triggers import text_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from gguf_fixtures import write_gguf
from ttp_fixtures import cli_env, json_out, run_cli


def _random(folder: Path, config_class: str, model_class: str, **extra: object) -> Path:
    """A randomly initialised decoder of the host's sizes (`extra` changed): a file whose
    family or shapes differ from the registration's."""
    import transformers

    torch.manual_seed(3)
    config = getattr(transformers, config_class)(**{**RECIPE["model"], **extra})
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


@dataclass
class World:
    """A running key server, its principals, the host checkpoint and its registration."""

    running: RunningServer
    tokens: dict[str, str]
    host: Path
    folder: Path
    registration: str = ""

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("gguf-ttp")
    host = decoders().host
    running = create_server(ServerConfig(  # the hostile corpus is more Verify calls than 10/min
        data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=5,
        verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED))
    tokens = {}
    for name, role in (("alice", "owner"), ("judge", "arbiter")):
        tokens[name] = new_token()
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    world = World(running, tokens, host, folder)
    sentences = folder / "sentences.txt"
    sentences.write_text("\n".join(stdlib_text()[:400]) + "\n", encoding="utf-8")
    triggers = text_triggers(sentences, host, max_length=32, count=32)
    bundle = derive_key(load_checkpoint(host), layer=KEY_LAYER, triggers=triggers, owner="alice")
    with world.client("alice") as alice:
        world.registration = alice.register(bundle, host).registration_id
    yield world
    running.stop(grace=1)


def test_gguf_copies_of_the_registered_host_match(world: World) -> None:
    """Q8_0 (through the command line), Q4_K and Q4_K_M (Q4_K with Q6_K for the attention
    values, MLP down projections and head) copies are signed matches at p <= 1e-9; an
    independently trained decoder of the same config, as Q8_0, is no_match."""
    q8 = write_gguf(world.host, world.folder / "stolen-q8_0.gguf", "Q8_0")
    q4k = write_gguf(world.host, world.folder / "stolen-q4_k.gguf", "Q4_K")
    q4km = write_gguf(world.host, world.folder / "stolen-q4_k_m.gguf", "Q4_K_M")
    innocent = write_gguf(decoders().independents[0], world.folder / "innocent.gguf", "Q8_0")
    env = cli_env(FREEMARK_SERVER=f"127.0.0.1:{world.running.port}",
                  FREEMARK_TOKEN=world.tokens["alice"])
    by_cli = json_out(run_cli("freemark.cli", "verify", "--registration", world.registration,
                              "--model", str(q8), "--json", env=env))
    assert by_cli["outcome"] == "match" and float(by_cli["p_value"]) <= 1e-9
    with world.client("alice") as alice:
        quantized = [alice.verify(world.registration, path) for path in (q4k, q4km)]
        other = alice.verify(world.registration, innocent)
    for verdict in quantized:
        assert verdict.outcome == "match" and verdict.p_value <= 1e-9
    assert other.outcome == "no_match" and other.p_value >= 1e-3


def _hostile(world: World, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    q4_0 = write_gguf(world.host, tmp_path / "q4_0.gguf", "Q4_0")
    builders: dict[str, tuple[Callable[[Path], Path], str]] = {
        "tensor-count bomb": (hostile_gguf.tensor_count_bomb, "9,223,372,036,854,775,808 tensors"),
        "key/value-count bomb": (hostile_gguf.kv_count_bomb, "metadata entries (caps"),
        "string of 2^62 bytes": (hostile_gguf.string_bomb, "over the cap of 1,048,576"),
        "array of 2^40 items": (hostile_gguf.array_bomb, "1,099,511,627,776 items"),
        "2^21 tokenizer strings": (hostile_gguf.string_array_bomb, "2,097,152 items"),
        "Q4_0 blocks declared Q8_0": (
            lambda dst: hostile_gguf.retyped(q4_0, dst, "blk.0.ffn_up.weight", "Q8_0"),
            "does not fit the bytes its blocks occupy"),
        "rows of partial blocks": (
            lambda dst: hostile_gguf.redimensioned(q4_0, dst, "blk.0.ffn_up.weight", (250,)),
            "whole blocks of 32 values"),
        "unsupported type": (
            lambda dst: hostile_gguf.unsupported_type(q4_0, dst, "blk.0.ffn_down.weight"),
            "is Q3_K; supported tensor types"),
        "unsupported architecture": (lambda dst: hostile_gguf.other_architecture(q4_0, dst),
                                     "'bloom' is not supported"),
        "another family": (
            lambda dst: write_gguf(_random(tmp_path / "qwen", "Qwen2Config", "Qwen2ForCausalLM"),
                                   dst, "Q8_0"),
            "a qwen2 model and the registered host a llama model"),
        "other sizes": (
            lambda dst: write_gguf(_random(tmp_path / "wider", "LlamaConfig", "LlamaForCausalLM",
                                           intermediate_size=384), dst, "Q8_0"),
            "intermediate_size 384 (host 256)"),
    }
    return {name: (build(tmp_path / f"hostile-{i}.gguf"), words)
            for i, (name, (build, words)) in enumerate(builders.items())}


def test_hostile_ggufs_are_refused_and_leave_nothing(world: World, tmp_path: Path) -> None:
    store = world.running.ctx.store
    before = store.tree_size()
    channel = grpc.insecure_channel(f"127.0.0.1:{world.running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name, (path, words) in _hostile(world, tmp_path).items():
        with world.client("judge") as judge, pytest.raises(FreemarkError) as refused:
            judge.verify(world.registration, path)
        error = refused.value
        assert getattr(error, "code", None) == grpc.StatusCode.INVALID_ARGUMENT, (name, error)
        assert words in str(error), (name, str(error))
        assert "Traceback" not in str(error)
        assert store.tree_size() == before, f"{name}: signed and logged something"
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    channel.close()
