"""Clear errors for every malformed input to derivation and extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freemark import derive_key, extract
from freemark.errors import InvalidInputError
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark_lab.models import DigitsCNN


@pytest.fixture(scope="module")
def model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture(scope="module")
def triggers() -> TriggerSet:
    rng = np.random.default_rng(0)
    return TriggerSet(inputs=rng.random((20, 1, 8, 8), dtype=np.float32))


def test_wrong_layer_lists_the_valid_ones(model: DigitsCNN, triggers: TriggerSet) -> None:
    with pytest.raises(InvalidInputError, match=r"no layer named 'fc9'.*fc1.*act.*fc2"):
        derive_key(model, layer="fc9", triggers=triggers, owner="alice")


def test_mismatched_trigger_shape(model: DigitsCNN) -> None:
    bad = TriggerSet(inputs=np.zeros((4, 1, 28, 28), dtype=np.float32))
    with pytest.raises(InvalidInputError, match=r"cannot run on the trigger inputs of shape \(1, 28, 28\)"):
        derive_key(model, layer="act", triggers=bad, owner="alice")


@pytest.mark.parametrize("n_bits", [8, 15, 8193, 100000])
def test_bits_outside_range(model: DigitsCNN, triggers: TriggerSet, n_bits: int) -> None:
    with pytest.raises(InvalidInputError, match=r"\[16, 8192\]"):
        derive_key(model, layer="act", triggers=triggers, owner="alice", n_bits=n_bits)


def test_empty_trigger_set() -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        TriggerSet(inputs=np.zeros((0, 1, 8, 8), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="non-empty"):
        select_triggers(np.zeros((0, 4)), np.zeros(0))


def test_key_from_another_width_is_refused(model: DigitsCNN, triggers: TriggerSet) -> None:
    bundle = derive_key(model, layer="act", triggers=triggers, owner="alice", n_bits=64)
    wider = DigitsCNN(hidden=256).eval()
    with pytest.raises(InvalidInputError, match="different width"):
        extract(wider, bundle)


def test_conv_layers_are_spatially_pooled(model: DigitsCNN, triggers: TriggerSet) -> None:
    activations, _ = capture(model, "features.3", triggers)
    assert activations.shape == (20, 32)
    bundle = derive_key(model, layer="features.3", triggers=triggers, owner="alice", n_bits=64)
    assert extract(model, bundle).matches == 64
