"""Models the key server reads itself (issue 20): named by a path under `--model-root`, over
a real server on loopback with its real sandbox.

The operator's mirror holds a digits host, a fine-tuned copy and an independent model as .pt2
programs, beside traps: a symbolic link to a file outside the root, a symbolic link to a
directory outside it, a FIFO, a directory. Alice registers her host by name and
verifies the copy and the independent model by name, and each verdict names the SHA-256 and
size of the file's bytes (what the sandbox judged, copied once into a sealed memory file while
hashed). Every path that climbs out, goes through a link, is missing or is not a regular file
is refused with INVALID_ARGUMENT, PERMISSION_DENIED or NOT_FOUND and a message that names the
requested path and never the server's disk; nothing is logged, the server stays SERVING.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freemark.derive import derive_key
from freemark.errors import ServerError
from freemark.formats.pt2 import load_program
from freemark.records.types import SignedVerdict
from freemark.rpc import KeyServiceClient, ServerModel
from freemark.scheme.triggers import load_triggers
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from ttp_fixtures import ModelFiles, build_models, cli_env, json_out, run_cli

S = grpc.StatusCode


@dataclass
class Hub:
    running: RunningServer
    files: ModelFiles
    root: Path
    outside: Path
    tokens: dict[str, str]
    registration_id: str

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    folder = tmp_path_factory.mktemp("model-root")
    (folder / "outside").mkdir()
    files = build_models(folder / "outside")
    root = folder / "mirror"
    (root / "acme").mkdir(parents=True)
    (root / "alice").mkdir()
    shutil.copy(files.host, root / "alice" / "host.pt2")
    shutil.copy(files.finetuned, root / "acme" / "finetuned.pt2")
    shutil.copy(files.independent, root / "acme" / "independent.pt2")
    (root / "acme" / "link.pt2").symlink_to(files.finetuned)  # out of the root
    (root / "outside").symlink_to(folder / "outside", target_is_directory=True)
    os.mkfifo(root / "acme" / "fifo.pt2")
    running = create_server(ServerConfig(
        data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1, model_root=root,
        verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED))
    tokens = {name: new_token() for name in ("alice", "mallory", "arbiter")}
    for name, role in (("alice", "owner"), ("mallory", "owner"), ("arbiter", "arbiter")):
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    bundle = derive_key(load_program(files.host), layer="act", owner="alice",
                        triggers=load_triggers(files.triggers))
    hub = Hub(running, files, root, folder / "outside", tokens, "")
    with hub.client("alice") as alice:
        hub.registration_id = alice.register(
            bundle, ServerModel("alice/host.pt2", "pt2")).registration_id
    yield hub
    running.stop(grace=1)


def _verified(hub: Hub, name: str) -> SignedVerdict:
    """The owner's verdict (an arbiter's is coarse by default: no digest to compare)."""
    with hub.client("alice") as alice:
        verdict = alice.verify(hub.registration_id, ServerModel(name, "pt2"))
    assert isinstance(verdict, SignedVerdict)
    return verdict


def test_models_named_under_the_root_are_judged_and_their_bytes_named(hub: Hub) -> None:
    """The host registered by name; its copy and an independent model verified by name, each
    verdict binding the SHA-256 and size of exactly the file's bytes."""
    copy, other = _verified(hub, "acme/finetuned.pt2"), _verified(hub, "acme/independent.pt2")
    assert copy.outcome == "match" and other.outcome == "no_match"
    for verdict, path in ((copy, hub.files.finetuned), (other, hub.files.independent)):
        data = path.read_bytes()
        assert verdict.suspect_sha256 == hashlib.sha256(data).digest()
        assert verdict.suspect_size == len(data)
    with hub.client("alice") as alice:  # the same bytes uploaded: the same verdict's facts
        uploaded = alice.verify(hub.registration_id, hub.files.finetuned)
    assert isinstance(uploaded, SignedVerdict)
    assert (uploaded.suspect_sha256, uploaded.outcome) == (copy.suspect_sha256, copy.outcome)


def test_the_cli_verifies_a_named_model_and_asks_for_a_format_its_suffix_does_not_tell(
        hub: Hub) -> None:
    """`freemark verify --server-model NAME`: the format read from the suffix where only one
    format uses it; a `.safetensors` name (a checkpoint, an adapter or bare weights) is
    refused before any call until `--server-format` names it."""
    env = cli_env(FREEMARK_SERVER=f"127.0.0.1:{hub.running.port}",
                  FREEMARK_TOKEN=hub.tokens["alice"])
    verdict = json_out(run_cli("freemark.cli", "verify", "--registration", hub.registration_id,
                               "--server-model", "acme/finetuned.pt2", "--json", env=env))
    assert verdict["outcome"] == "match"
    assert verdict["suspect_sha256"] == hashlib.sha256(hub.files.finetuned.read_bytes()).hexdigest()
    before = hub.running.ctx.store.tree_size()
    vague = run_cli("freemark.cli", "verify", "--registration", hub.registration_id,
                    "--server-model", "acme/model.safetensors", env=env, check=False)
    assert vague.returncode == 2 and "--server-format" in vague.stderr, vague.stderr
    both = run_cli("freemark.cli", "verify", "--registration", hub.registration_id,
                   "--server-model", "acme/finetuned.pt2", "--model", str(hub.files.finetuned),
                   env=env, check=False)
    assert both.returncode == 2 and "without --model" in both.stderr, both.stderr
    assert hub.running.ctx.store.tree_size() == before


def test_a_stolen_copy_named_under_the_root_cannot_be_registered_by_the_thief(hub: Hub) -> None:
    """Naming a file instead of uploading it skips no check: Mallory's Register of the
    mirrored fine-tune of Alice's host, under his own key, meets the prior-claim scan and
    its fixed refusal (no id, no figure), and nothing is logged."""
    bundle = derive_key(load_program(hub.files.finetuned), layer="act", owner="mallory",
                        triggers=load_triggers(hub.files.triggers))
    before = hub.running.ctx.store.tree_size()
    with hub.client("mallory") as mallory, pytest.raises(ServerError) as caught:
        mallory.register(bundle, ServerModel("acme/finetuned.pt2", "pt2"))
    assert caught.value.reason == "ALREADY_CLAIMED", str(caught.value)
    assert caught.value.message.endswith(CLAIMED)
    assert "reg_" not in caught.value.message and "log10" not in caught.value.message
    assert hub.running.ctx.store.tree_size() == before


REFUSALS = [
    ("../outside/finetuned.pt2", S.INVALID_ARGUMENT, "relative path of plain names"),
    ("/etc/hostname", S.INVALID_ARGUMENT, "relative path of plain names"),
    ("acme/./finetuned.pt2", S.INVALID_ARGUMENT, "relative path of plain names"),
    ("acme/link.pt2", S.PERMISSION_DENIED, "is a symbolic link"),
    ("outside/finetuned.pt2", S.PERMISSION_DENIED, "is a symbolic link"),
    ("acme/missing.pt2", S.NOT_FOUND, "does not exist"),
    ("acme/finetuned.pt2/x", S.NOT_FOUND, "does not exist"),
    ("acme/fifo.pt2", S.INVALID_ARGUMENT, "not a regular file"),
    ("acme", S.INVALID_ARGUMENT, "not a regular file"),
]


@pytest.mark.parametrize(("name", "code", "words"), REFUSALS)
def test_names_out_of_the_root_or_of_no_file_are_refused(hub: Hub, name: str, code: S,
                                                         words: str) -> None:
    before = hub.running.ctx.store.tree_size()
    with hub.client("arbiter") as arbiter, pytest.raises(Exception) as caught:
        arbiter.verify(hub.registration_id, ServerModel(name, "pt2"))
    error = caught.value
    assert getattr(error, "code", None) == code, error
    message = str(error)
    assert words in message and repr(name) in message, message
    for secret in (str(hub.root), str(hub.outside), str(hub.root.parent)):
        assert secret not in message, message
    assert hub.running.ctx.store.tree_size() == before
    channel = grpc.insecure_channel(f"127.0.0.1:{hub.running.port}")
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status
    finally:
        channel.close()
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_named_file_takes_no_chunks_and_no_announced_digest(hub: Hub) -> None:
    """The server measures a named file itself: a header that announces a size or SHA-256
    for it, or chunks sent after it, is malformed."""
    channel = grpc.insecure_channel(f"127.0.0.1:{hub.running.port}")
    stub = keyservice_pb2_grpc.KeyServiceStub(channel)
    metadata = [("authorization", f"Bearer {hub.tokens['arbiter']}")]
    named = {"model_path": "acme/finetuned.pt2", "format": pb.MODEL_FORMAT_PT2}
    cases = {
        "chunk": ([pb.UploadHeader(**named)], [pb.VerifyRequest(chunk=b"extra bytes")],
                  "send no chunk"),
        "size": ([pb.UploadHeader(**named, total_size=10)], [], "leave total_size and sha256"),
        "digest": ([pb.UploadHeader(**named, sha256=bytes(32))], [],
                   "leave total_size and sha256"),
    }
    try:
        for case, ((upload,), rest, words) in cases.items():
            header = pb.VerifyRequest(header=pb.VerifyHeader(
                registration_id=hub.registration_id, upload=upload))
            with pytest.raises(grpc.RpcError) as caught:
                stub.Verify(iter([header, *rest]), metadata=metadata, timeout=120)
            assert caught.value.code() == S.INVALID_ARGUMENT, case
            assert words in (caught.value.details() or ""), case
    finally:
        channel.close()
