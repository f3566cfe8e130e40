"""`capture_every` finds a layer's activations whatever it is called: renamed, wrapped in a
container, or computed by a function no module outputs; it reads only models that take the
triggers' kind of input, decided without their values. `capture_every_sets` reads several
trigger sets in one pass and gives each what it would get alone (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.formats.pt2 import load_program, save_program
from freemark.scheme.activations import accepts, capture, capture_every, capture_every_sets
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


def test_sets_read_in_one_pass_get_what_each_gets_alone(tmp_path: Path) -> None:
    """Batches of 5 straddle the sets (7, 3 and 12 inputs): each set's rows are split back
    out, tensor by tensor, as a scan of that set alone lists them."""
    program = _program(Inlined(Named()), tmp_path / "inlined.pt2")
    rng = np.random.default_rng(1)
    sets = [TriggerSet(inputs=rng.random((n, 1, 8, 8), dtype=np.float32)) for n in (7, 3, 12)]
    together = capture_every_sets(program, sets, width=24, batch_size=5)
    for triggers, scanned in zip(sets, together, strict=True):
        alone = capture_every(program, triggers, width=24)
        assert not isinstance(scanned, Exception) and alone
        assert [name for name, _ in scanned] == [name for name, _ in alone]
        assert all(a.shape == (len(triggers), 24) and np.allclose(a, b, atol=1e-6)
                   for (_, a), (_, b) in zip(scanned, alone, strict=True))
    with pytest.raises(ValueError, match="one input kind"):
        capture_every_sets(program, [TRIGGERS, TriggerSet(inputs=np.zeros((2, 1, 4, 4)))])


class Hostile(nn.Module):
    """Its output is not finite on an input brighter than 0.9, and it fails on a batch
    holding an input brighter than 2: failures that depend on the inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.flatten(1).amax(1, keepdim=True)
        if bool((peak > 2).any()):
            raise IndexError("index 9206772093063736 is out of bounds")
        return torch.relu(self.fc(x.flatten(1))) + torch.sqrt(0.9 - peak)


def test_a_set_that_fails_or_goes_non_finite_leaves_the_others_as_they_are_alone() -> None:
    """One pass over a dark, a bright and a failing set (batches of 4, one per set): the
    dark set gets what it gets alone, the bright set its not-finite tensor as zeros (only
    its own rows), the failing set the error a scan of it alone raises; the pass goes on
    past the failing batch (the set after it is still read)."""
    dark = TriggerSet(inputs=np.full((4, 1, 8, 8), 0.25, dtype=np.float32))
    bright = TriggerSet(inputs=np.full((4, 1, 8, 8), 0.95, dtype=np.float32))
    failing = TriggerSet(inputs=np.full((4, 1, 8, 8), 3.0, dtype=np.float32))
    model = Hostile()
    first, second, third, fourth = capture_every_sets(model, [dark, bright, failing, dark],
                                                      width=24, batch_size=4)
    alone = capture_every(model, dark, width=24)
    for scanned in (first, fourth):
        assert not isinstance(scanned, Exception)
        assert [n for n, _ in scanned] == [n for n, _ in alone] == ["fc", ""]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(scanned, alone, strict=True))
        assert all(np.any(layer) for _, layer in scanned)
    assert not isinstance(second, Exception)
    (_, fc), (_, out) = second
    assert np.any(fc) and not np.any(out)
    assert isinstance(third, InvalidInputError) and "cannot run" in str(third)
    with pytest.raises(InvalidInputError, match="cannot run"):
        capture_every(model, failing, width=24)
