"""Gaussian weight noise: the blunt instrument, scaled to each weight tensor's own spread."""

from __future__ import annotations

import copy

import torch
from torch import nn

from freemark_lab.attacks.layers import weighted_layers
from freemark_lab.tasks import Task


def gaussian_noise(model: nn.Module, task: Task, *, scale: float, seed: int = 0) -> nn.Module:
    """Add N(0, (scale · std(W))²) to every Linear/Conv weight W; seeded.

    Relative to each tensor's standard deviation so that one `scale` means the same
    damage to a conv filter and to a transformer projection.
    """
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in weighted_layers(copied):
            w = layer.weight
            w.add_(torch.randn(w.shape, generator=generator, dtype=w.dtype) * scale * w.std())
    return copied
