"""`capture` reads large inputs a few at a time (the sandbox's memory limit and the page-fault
cost of huge tensors) and small ones 256 at a time; batching never changes the activations."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from freemark.scheme.activations import BATCH_INPUT_BYTES, DEFAULT_BATCH, capture
from freemark.scheme.triggers import TriggerSet


class _Recorder(nn.Module):
    """A 1x1 convolution that remembers the batch size of every forward pass."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 4, 1)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.conv(x)


def test_imagenet_sized_inputs_are_read_a_few_at_a_time() -> None:
    model = _Recorder(3)
    inputs = np.random.default_rng(0).random((10, 3, 224, 224), dtype=np.float32)
    activations, _ = capture(model, "conv", TriggerSet(inputs=inputs))
    per_pass = BATCH_INPUT_BYTES // inputs[0].nbytes
    assert model.batches == [per_pass] * (10 // per_pass) + [10 % per_pass]
    model.batches.clear()
    one_by_one, _ = capture(model, "conv", TriggerSet(inputs=inputs), batch_size=1)
    assert model.batches == [1] * 10
    np.testing.assert_allclose(activations, one_by_one, rtol=1e-6, atol=1e-7)


def test_small_inputs_keep_the_full_batch() -> None:
    model = _Recorder(1)
    inputs = np.random.default_rng(1).random((300, 1, 8, 8), dtype=np.float32)
    capture(model, "conv", TriggerSet(inputs=inputs))
    assert model.batches == [DEFAULT_BATCH, 300 - DEFAULT_BATCH]
