"""`capture_every` finds a layer's activations whatever it is called: renamed, wrapped in a
container, or computed by a function no module outputs; it reads only models that take the
triggers' kind of input, decided without their values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from freemark.formats.pt2 import load_program, save_program
from freemark.scheme.activations import accepts, capture, capture_every
from freemark.scheme.triggers import TriggerSet

TRIGGERS = TriggerSet(inputs=np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32))


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class Inlined(nn.Module):
    """The same weights, every module renamed, the ReLU a function inside a container."""

    def __init__(self, source: Named) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), source.fc1)
        self.out = source.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(x.flatten(1))))


def _program(model: nn.Module, path: Path) -> torch.export.ExportedProgram:
    save_program(model, (torch.zeros(2, 1, 8, 8),), path)
    return load_program(path)


def test_a_renamed_inlined_layer_is_found_by_its_values(tmp_path: Path) -> None:
    host = Named()
    expected, _ = capture(host, "act", TRIGGERS)
    program = _program(Inlined(host), tmp_path / "inlined.pt2")
    found = capture_every(program, TRIGGERS, width=24)
    assert any(np.allclose(layer, expected, atol=1e-6) for _, layer in found)
    assert all(layer.shape == (7, 24) for _, layer in found)
    names = [name for name, _ in found]  # each tensor by its graph node's name, once
    assert all(names) and len(set(names)) == len(names)
    widths = {layer.shape[1] for _, layer in capture_every(program, TRIGGERS)}
    assert {24, 10, 64} <= widths


def test_only_models_that_take_the_triggers_kind_are_read(tmp_path: Path) -> None:
    program = _program(Named(), tmp_path / "named.pt2")
    other_size = TriggerSet(inputs=np.zeros((3, 1, 16, 16), dtype=np.float32))
    tokens = TriggerSet(inputs=np.zeros((3, 1, 8, 8), dtype=np.int64))
    assert accepts(program, TRIGGERS)
    assert not accepts(program, other_size) and capture_every(program, other_size) == []
    assert not accepts(program, tokens)
    assert not accepts(Named(), other_size)  # a module: a pass on zeros of that shape fails


def test_a_model_that_fails_on_the_triggers_values_raises() -> None:
    """It takes their shape (it runs on zeros) but fails on their values: the scan raises,
    it does not come back empty (the key server counts that as a claim)."""

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            index = (x.flatten(1).sum(1) > 1).long() * 5
            return torch.ones(3, 4)[index]

    with pytest.raises(Exception, match="cannot run"):
        capture_every(Fails(), TRIGGERS)
