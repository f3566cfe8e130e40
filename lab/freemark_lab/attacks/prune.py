"""Pruning attacks: zero the weights or whole units a thief believes the model can spare.

Pruned weights are set to zero rather than removed, which is what a sparse export stores
and keeps every layer's width (so the key still applies and the report measures the
watermark, not a shape mismatch).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from freemark_lab.attacks.layers import weighted_layers
from freemark_lab.tasks import Task


def magnitude_prune(model: nn.Module, task: Task, *, rate: float,
                    layers: Sequence[str] = ("*",)) -> nn.Module:
    """Zero the globally smallest `rate` fraction of Linear/Conv weights (biases kept).

    Global rather than per-layer, as in the lottery-ticket literature: the attack spends
    its sparsity where weights are small, which is where it hurts accuracy least.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    copied = copy.deepcopy(model)
    weights = [layer.weight for _, layer in weighted_layers(copied, layers)]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    count = int(rate * magnitudes.numel())
    if count == 0:
        return copied
    threshold = torch.kthvalue(magnitudes, count).values
    with torch.no_grad():
        for w in weights:
            w.masked_fill_(w.abs() <= threshold, 0.0)
    return copied


def structured_prune(model: nn.Module, task: Task, *, rate: float,
                     layers: Sequence[str] = ("*",)) -> nn.Module:
    """Zero the `rate` fraction of output channels/units with the smallest L1 norm, per layer.

    Applied to every matching Linear/Conv2d except the classifier head (pruning classes
    away is not an attack on the watermark). Whole units go, weights and bias together,
    which is what channel pruning for speed does.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in weighted_layers(copied, layers, exclude=(task.head,)):
            norms = layer.weight.detach().abs().flatten(1).sum(dim=1)
            count = int(rate * len(norms))
            if count == 0:
                continue
            drop = torch.argsort(norms)[:count]
            layer.weight[drop] = 0.0
            if layer.bias is not None:
                layer.bias[drop] = 0.0
    return copied
