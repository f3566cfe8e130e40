"""A stolen model cannot be registered under another owner by renaming its modules (issue 18,
item 2), over a real key server with the real sandbox.

Alice registers the digits host with a panel of five independent models. Mallory steals it
and renames what the key server used to compare by: (a) the weightless key-layer module on a
fine-tuned copy (`act` -> `act2`: the architecture family stays, the old key found no layer
of that name and the failure counted as "no match"); (b) one weighted module on the exact
weights (`fc2` -> `head`: family and fingerprint change, so nothing was compared); (c) every
module renamed, the key layer wrapped in a container beside an extra no-op module, and the
ReLU inlined as a function (no module holds the key layer at all). Each is refused
ALREADY_EXISTS with the fixed message, and nothing is added: no registration, no log entry.
A scan the key server cannot complete is a claim, never a clearance. Independently trained
models of the same input signature, of the host's architecture and of another, still register:
the figure the key server's docs quote for false claims is printed here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import scheme_models as sm
from freemark.derive import derive_key
from freemark.errors import AlreadyRegisteredError
from freemark.formats.pt2 import save_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.activations import MAX_SCANNED_TENSORS
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.handlers.register import CLAIMED
from freemark_keyserver.server import RunningServer, create_server
from ttp_fleet import add_principals

TASK = "digits"
PANEL_SEEDS = range(5)
INDEPENDENT_SEEDS = range(50, 55)  # trained here, seen by neither the panel nor any threshold
STUDENT_SEEDS = range(60, 62)  # another architecture of the same input signature


class Renamed(nn.Module):
    """A digits CNN's layers under other module names; `inline` computes the key layer's ReLU
    as a function, so no module outputs it; `wrap` puts fc1 and the ReLU in a Sequential
    beside an extra no-op module."""

    def __init__(self, source: nn.Module, names: dict[str, str], *, wrap: bool = False,
                 inline: bool = False) -> None:
        super().__init__()
        self.names, self.wrap, self.inline = names, wrap, inline
        setattr(self, names["features"], source.features)
        setattr(self, names["flatten"], nn.Flatten())
        if wrap:
            block = nn.Sequential(source.fc1, nn.Identity()) if inline else nn.Sequential(
                source.fc1, nn.Identity(), nn.ReLU())
            setattr(self, names["fc1"], block)
        else:
            setattr(self, names["fc1"], source.fc1)
            if not inline:
                setattr(self, names["act"], nn.ReLU())
        setattr(self, names["fc2"], source.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        h = getattr(self, n["fc1"])(getattr(self, n["flatten"])(getattr(self, n["features"])(x)))
        if self.inline:
            h = torch.relu(h)
        elif not self.wrap:
            h = getattr(self, n["act"])(h)
        return getattr(self, n["fc2"])(h)


IDENTITY = {k: k for k in ("features", "flatten", "fc1", "act", "fc2")}


class Padded(nn.Module):
    """An independent model that computes more tensors of the key's width than a scan reads."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.features, self.flatten, self.fc1, self.act, self.fc2 = (
            source.features, nn.Flatten(), source.fc1, nn.ReLU(), source.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.flatten(self.features(x))))
        extra = h
        for _ in range(MAX_SCANNED_TENSORS + 1):
            extra = extra * 0.5
        return self.fc2(h + 0.0 * extra)


@dataclass
class World:
    folder: Path
    running: RunningServer
    tokens: dict[str, str]
    example: tuple[torch.Tensor, ...]

    def client(self, who: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[who],
                                timeout=600)

    def export(self, label: str, model: nn.Module) -> Path:
        path = self.folder / f"{label}.pt2"
        save_program(model, self.example, path)
        return path

    def tree_size(self) -> int:
        return self.running.ctx.store.tree_size()

    def registrations(self) -> list[str]:
        """Every registration id, as the admin lists them."""
        with self.client("admin") as client:
            return sorted(r.registration_id for r in client.list_registrations())

    def register(self, owner: str, label: str, model: nn.Module, layer: str, seed: int) -> str:
        task = sm.task(TASK)
        bundle = derive_key(model, layer=layer, triggers=task.lab.triggers(10, seed), owner=owner)
        with self.client(owner) as client:
            return client.register(bundle, self.export(label, model)).registration_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("renamed")
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1)
    running = create_server(config)
    tokens = add_principals(config.database, [("alice", "owner"), ("mallory", "owner"),
                                              ("admin", "admin")])
    task = sm.task(TASK)
    w = World(folder, running, tokens, task.lab.sample_inputs(2))
    bundle = derive_key(sm.host(TASK), layer="act", triggers=task.lab.triggers(10, 0),
                        owner="alice")
    references = [w.export(f"reference{s}", sm.independent(TASK, s)) for s in PANEL_SEEDS]
    with w.client("alice") as client:
        receipt = client.register(bundle, w.export("host", sm.host(TASK)), references=references)
    assert receipt.panel.size == len(PANEL_SEEDS)
    try:
        yield w
    finally:
        running.stop(0)


def _refused(world: World, label: str, model: nn.Module, layer: str, seed: int) -> None:
    """Mallory's Register of `model` (his own key on `layer`) is refused ALREADY_EXISTS with
    the fixed message, and adds no registration and no log entry."""
    before, size = world.registrations(), world.tree_size()
    with pytest.raises(AlreadyRegisteredError) as caught:
        world.register("mallory", label, model, layer, seed)
    assert caught.value.message.endswith(CLAIMED), str(caught.value)
    assert world.registrations() == before
    assert world.tree_size() == size


def test_a_renamed_key_layer_module_on_a_finetuned_copy_is_claimed(world: World) -> None:
    """(a) `act` -> `act2` on a fine-tuned copy: same family, the key's layer name gone."""
    stolen = Renamed(sm.finetuned(TASK), {**IDENTITY, "act": "act2"})
    _refused(world, "act2", stolen, "act2", seed=5)


def test_a_renamed_weighted_module_on_the_exact_weights_is_claimed(world: World) -> None:
    """(b) `fc2` -> `head` on the owner's exact weights: another family and fingerprint."""
    stolen = Renamed(sm.host(TASK), {**IDENTITY, "fc2": "head"})
    _refused(world, "head", stolen, "act", seed=6)


@pytest.mark.parametrize("wrap,inline", [(False, False), (True, False), (False, True)])
def test_every_module_renamed_wrapped_or_inlined_is_claimed(world: World, wrap: bool,
                                                           inline: bool) -> None:
    """(c) every module renamed, on the fine-tuned copy; the key layer wrapped in a Sequential
    beside an extra no-op module, or computed by a function that no module outputs."""
    names = {"features": "body", "flatten": "squash", "fc1": "proj", "act": "gate",
             "fc2": "classify"}
    stolen = Renamed(sm.finetuned(TASK), names, wrap=wrap, inline=inline)
    layer = "proj" if wrap or inline else "gate"  # Mallory keys the layer he can name
    _refused(world, f"all-renamed-{wrap}-{inline}", stolen, layer, seed=7)


def test_a_scan_that_cannot_complete_is_a_claim(world: World) -> None:
    """Fail closed: an upload that exceeds what a scan may read (here, more tensors of the
    key's width than the cap) is refused as claimed, never cleared, even though it is an
    independent model."""
    _refused(world, "padded", Padded(sm.independent(TASK, 56)), "act", seed=8)


def test_independent_models_of_the_same_input_signature_still_register(world: World) -> None:
    """No false claim: independently trained models, of the host's architecture and of
    another one, taking the same 8 x 8 inputs, are scanned with Alice's key (both tests, every
    tensor) and register."""
    task = sm.task(TASK)
    models: dict[str, nn.Module] = {f"independent{s}": sm.independent(TASK, s)
                                    for s in INDEPENDENT_SEEDS}
    for seed in STUDENT_SEEDS:
        models[f"student{seed}"] = task.lab.fit(task.lab.new_model("small", seed),
                                                epochs=task.recipe.epochs, lr=1e-3, seed=seed)
    registered = []
    for number, (label, model) in enumerate(models.items()):
        registered.append(world.register("mallory", label, model, "act", seed=20 + number))
    assert len(set(registered)) == len(models)
    print(f"\nfalse claims: 0 of {len(models)} independent models of the same input signature")
