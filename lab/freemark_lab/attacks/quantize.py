"""Quantization attacks: round every weight to what an int8 or fp16 export would store.

The model keeps running in float32 after the round trip, which isolates the effect of the
stored precision (the part a thief controls) from kernel-specific arithmetic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from freemark_lab.attacks.layers import weighted_layers
from freemark_lab.tasks import Task

INT8_LEVELS = 127


def int8(model: nn.Module, task: Task) -> nn.Module:
    """Symmetric per-output-channel int8 weights (as dynamic int8 quantization stores them)."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in weighted_layers(copied):
            w = layer.weight
            scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / INT8_LEVELS
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.copy_(torch.round(w / scale.view(shape)).clamp(-INT8_LEVELS, INT8_LEVELS) * scale.view(shape))
    return copied


def fp16(model: nn.Module, task: Task) -> nn.Module:
    """Every floating parameter and buffer rounded through float16."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in list(copied.parameters()) + list(copied.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().to(tensor.dtype))
    return copied
