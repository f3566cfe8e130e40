"""An output-key Register runs the prior-claim check against white-box keys too (issue 19).

Alice registers her digits host (tests/blackbox_models.py) under a white-box key alone.
Mallory fine-tunes it on other data (other weights, so the same-weights check cannot see
it) and registers the copy under an output key of her own, derived on the copy against the
public panel: the key server reads the copy in the sandbox child that reads it as her host,
on the claim index's probes and then on Alice's triggers, judges every tensor with Alice's
key, and refuses with the fixed ALREADY_CLAIMED text (no registration id, no figure);
nothing is logged. Bob's independently trained model registers under an output key (no
false claim). Before this check, Mallory's Register was signed: an output-key Register was
judged only by the same-weights check and earlier output keys. One key server per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import blackbox_models as bm
from freemark.blackbox.key import OutputKey
from freemark.blackbox.queries import derive_output_key
from freemark.derive import derive_key
from freemark.errors import ServerError
from freemark.formats.pt2 import save_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.triggers import select_triggers
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.server import RunningServer, create_server
from ttp_fleet import add_principals

ALICE = "alice@example.com"
MALLORY = "mallory@example.com"
BOB = "bob@example.com"


@dataclass
class World:
    folder: Path
    running: RunningServer
    tokens: dict[str, str]
    references: list[Path]

    def tree_size(self) -> int:
        return self.running.ctx.store.tree_size()

    def register_output_key(self, who: str, model: nn.Module, name: str) -> str:
        """`who` derives a small output key on `model` against the public panel and
        registers it with the panel; the receipt's registration id."""
        key: OutputKey = derive_output_key(model, *bm.owner_data(), bm.panel(), owner=who,
                                           n_queries=16, n_sets=1, recipes=bm.RECIPES)
        with KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                              timeout=600) as client:
            receipt = client.register_output_key(key, _program(model, self.folder / name),
                                                 references=self.references)
        return receipt.registration_id


def _program(model: nn.Module, path: Path) -> Path:
    save_program(model, (torch.from_numpy(bm.data().x_train[:2]),), path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("output-key-prior-claims")
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1)
    running = create_server(config)
    tokens = add_principals(config.database, [(ALICE, "owner"), (MALLORY, "owner"),
                                              (BOB, "owner")])
    try:
        bundle = derive_key(bm.host(), layer="act", owner=ALICE,
                            triggers=select_triggers(*bm.owner_data(), per_class=10, seed=0))
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens[ALICE],
                              timeout=600) as client:
            client.register(bundle, _program(bm.host(), folder / "alice.pt2"))
        references = [_program(m, folder / f"reference{i}.pt2") for i, m in enumerate(bm.panel())]
        yield World(folder, running, tokens, references)
    finally:
        running.stop(0)


def test_a_copy_of_a_white_box_host_cannot_be_registered_under_an_output_key(
        world: World) -> None:
    size = world.tree_size()
    with pytest.raises(ServerError) as caught:
        world.register_output_key(MALLORY, bm.finetuned(), "mallory.pt2")
    assert caught.value.reason == "ALREADY_CLAIMED", str(caught.value)
    assert caught.value.message.endswith(CLAIMED)  # the fixed text: no id, no figure
    assert "reg_" not in caught.value.message and "log10" not in caught.value.message
    assert world.tree_size() == size  # nothing signed, nothing logged


def test_an_independent_model_registers_under_an_output_key(world: World) -> None:
    size = world.tree_size()
    registration_id = world.register_output_key(BOB, bm.independents()[0], "bob.pt2")
    assert registration_id.startswith("reg_")
    assert world.tree_size() == size + 1
