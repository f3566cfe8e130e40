"""Decoder language models end to end, over a real key server and its sandbox (issue 20).

The commands are the decoder walk-through's in docs/huggingface.md, read from the page and
run as written (the model names replaced by the fixtures' directories, `$REG` by the
registration's id): text triggers from the host's own tokenizer, a key on an MLP activation
of a middle block, the `save_pretrained` directory registered with three independently
trained references as the aligned test's panel, then verdicts. The host is a small Llama
trained here on real text (`decoder_fixtures`). A fine-tuned copy and a copy with every
block's MLP units and attention heads relabelled are signed matches at p <= 1e-9; five
independently trained decoders of the same recipe are no_match at p >= 1e-3. Configs whose
RoPE settings, heads or sizes overflow are refused with INVALID_ARGUMENT and leave nothing.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from decoder_fixtures import KEY_LAYER, Decoders, decoders
from freemark.errors import InvalidModelError
from freemark.rpc import KeyServiceClient
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from gguf_fixtures import write_gguf
from ttp_fixtures import cli_env, json_out, run_cli

CLIENT = "freemark.cli"
DOC = Path(__file__).resolve().parents[2] / "docs" / "huggingface.md"
SECTION = "## 5. Decoder language models: a walk-through"


def walkthrough() -> list[list[str]]:
    """The `freemark` commands of the page's decoder walk-through, as argument lists."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the walk-through has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line)
        while words and "=" in words[0]:  # FREEMARK_TOKEN=$ALICE: the test's environment
            words = words[1:]
        if words and words[0] == "freemark":
            commands.append(words[1:])
    return commands


@dataclass
class Story:
    """The running key server, the fixtures and every command's JSON output, in order."""

    running: RunningServer
    token: str  # the owner's
    files: Decoders
    outputs: dict[str, dict[str, object]]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    files = decoders()
    folder = tmp_path_factory.mktemp("decoders")
    running = create_server(ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                                         grace_seconds=5))
    token = new_token()
    running.ctx.store.add_principal(Principal("alice", "owner", hash_token(token), 0))
    env = cli_env(FREEMARK_SERVER=f"127.0.0.1:{running.port}", FREEMARK_TOKEN=token)
    names = {"host": files.host, "finetuned": files.finetuned, "relabelled": files.relabelled,
             "sentences.txt": files.sentences,
             **{f"independent{i}": p for i, p in enumerate(files.independents, start=1)},
             **{f"reference{i}": p for i, p in enumerate(files.references, start=1)},
             "triggers.npz": folder / "triggers.npz", "alice.fmk": folder / "alice.fmk"}
    outputs: dict[str, dict[str, object]] = {}
    registration = ""
    try:
        for words in walkthrough():
            args = [str(names.get(w, w)) if w != "$REG" else registration for w in words]
            result = run_cli(CLIENT, *args, env=env)
            label = words[words.index("--model") + 1] if words[0] == "verify" else words[0]
            outputs[label] = json_out(result) if "--json" in words else {}
            if words[0] == "register":
                registration = str(outputs[label]["registration_id"])
        yield Story(running, token, files, outputs)
    finally:
        running.stop(grace=1)


def test_the_walkthrough_registers_the_decoder_host_with_its_panel(story: Story) -> None:
    commands = walkthrough()
    assert [c[0] for c in commands[:3]] == ["triggers", "keygen", "register"]
    assert KEY_LAYER in commands[1]
    receipt = story.outputs["register"]
    assert receipt["layer"] == KEY_LAYER and receipt["owner"] == "alice"
    assert str(receipt["registration_id"]).startswith("reg_")


def _shown(name: str, verdict: dict[str, object]) -> None:
    """One line per verdict for `pytest -s` (the figures docs/huggingface.md quotes)."""
    tests = {t["name"]: t["log10_p_value"] for t in verdict.get("tests", [])}  # type: ignore[attr-defined]
    print(f"{name}: {verdict['outcome']} log10 p = {verdict['log10_p_value']:.1f} {tests}")


@pytest.mark.parametrize("copy", ["finetuned", "relabelled"])
def test_copies_of_the_decoder_are_signed_matches(story: Story, copy: str) -> None:
    verdict = story.outputs[copy]
    _shown(copy, verdict)
    assert verdict["outcome"] == "match" and float(str(verdict["p_value"])) <= 1e-9, verdict
    assert verdict["signature"]


def test_independent_decoders_are_not_matches(story: Story) -> None:
    judged = [name for name in story.outputs if name.startswith("independent")]
    assert len(judged) == 5
    for name in judged:
        verdict = story.outputs[name]
        _shown(name, verdict)
        assert verdict["outcome"] == "no_match" and float(str(verdict["p_value"])) >= 1e-3, (
            name, verdict)
        assert verdict["signature"]


@pytest.mark.parametrize(("changes", "words"), [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e400}}, "rope_theta=inf"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 1e6, "rope_theta": 1e4}}, "factor="),
    ({"num_key_value_heads": 3}, "does not divide"),
    ({"head_dim": 10**6}, "head_dim=1000000 is over the cap"),
    ({"max_position_embeddings": 10**12}, "is over the cap"),
    ({"num_hidden_layers": 96, "hidden_size": 8192, "intermediate_size": 65536,
      "num_attention_heads": 64}, "parameters, over the cap"),
])
def test_hostile_decoder_configs_are_refused_without_side_effects(
        story: Story, tmp_path: Path, changes: dict[str, object], words: str) -> None:
    """The host's weights under a config whose RoPE, heads or sizes overflow, sent past the
    CLI's own checks: INVALID_ARGUMENT naming the field, nothing logged or registered."""
    values = json.loads((story.files.host / "config.json").read_text()) | changes
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(str(story.files.host / "model.safetensors")), str(hostile),
              metadata={"freemark.hf_config": json.dumps(values)})
    store = story.running.ctx.store
    before = store.tree_size(), len(store.list_registrations(None, 100, "")[0])
    registration = str(story.outputs["register"]["registration_id"])
    with KeyServiceClient(f"127.0.0.1:{story.running.port}", token=story.token,
                          timeout=300) as alice, pytest.raises(InvalidModelError) as caught:
        alice.verify(registration, hostile, fmt="hf")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(caught.value)
    assert (store.tree_size(), len(store.list_registrations(None, 100, "")[0])) == before


def test_a_relabelled_copy_converted_to_gguf_matches_through_the_panel(story: Story,
                                                                       tmp_path: Path) -> None:
    """The thief's full chain: the host with every MLP's hidden units and attention heads
    relabelled, converted to GGUF and quantized to Q4_K_M. The plain test cannot read it (the
    relabelling moved the key's units); the registration's panel gives the aligned test, which
    does: a signed match at p <= 1e-9."""
    stolen = write_gguf(story.files.relabelled, tmp_path / "relabelled-q4_k_m.gguf", "Q4_K_M")
    registration = str(story.outputs["register"]["registration_id"])
    with KeyServiceClient(f"127.0.0.1:{story.running.port}", token=story.token,
                          timeout=300) as alice:
        verdict = alice.verify(registration, stolen)
    tests = {t.name: t for t in verdict.tests}
    _shown("relabelled as Q4_K_M", {"outcome": verdict.outcome,
                                     "log10_p_value": verdict.log10_p_value, "tests": [
                                         {"name": n, "log10_p_value": t.log10_p_value}
                                         for n, t in tests.items()]})
    assert verdict.outcome == "match" and verdict.p_value <= 1e-9
    assert tests["aligned"].p_value <= 1e-9 and tests["plain"].p_value > tests["aligned"].p_value
