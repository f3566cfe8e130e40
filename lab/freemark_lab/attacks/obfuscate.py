"""Structural obfuscation: rewrite the key layer so the function is unchanged but its units move.

Each attack here is exactly function-preserving (up to float rounding), so it costs a thief
nothing, and each defeats plain white-box extraction, which reads unit i of the suspect as
unit i of the host. The counter-measure is the library's aligned test (`freemark.verdict.canon`,
`freemark.verdict.aligned`), calibrated on a reference panel.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from freemark_lab.attacks.layers import linear, replace
from freemark_lab.tasks import Task

DUMMY_MODES = ("random", "zero", "split")


def permute_units(model: nn.Module, task: Task, *, seed: int = 0) -> nn.Module:
    """Reorder the key layer's units: the producer's rows and the consumer's columns alike."""
    copied = copy.deepcopy(model)
    producer, consumer = linear(copied, task.producer), linear(copied, task.consumer)
    order = torch.randperm(producer.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        producer.weight.copy_(producer.weight[order])
        if producer.bias is not None:
            producer.bias.copy_(producer.bias[order])
        consumer.weight.copy_(consumer.weight[:, order])
    return copied


def rescale_units(model: nn.Module, task: Task, *, low: float = 0.1, high: float = 10.0,
                  seed: int = 0) -> nn.Module:
    """Scale unit i's pre-activation by s_i > 0 (log-uniform in [low, high]) and its readers by 1/s_i.

    Function-preserving only across a positively homogeneous activation (ReLU), so it is
    refused for GELU layers such as MiniLM's intermediate.
    """
    if not task.positive_homogeneous:
        raise ValueError(f"the key layer of {task.name} is not positively homogeneous; "
                         f"rescaling would change the function")
    if not 0.0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    copied = copy.deepcopy(model)
    producer, consumer = linear(copied, task.producer), linear(copied, task.consumer)
    generator = torch.Generator().manual_seed(seed)
    log_s = torch.rand(producer.out_features, generator=generator) * math.log(high / low) + math.log(low)
    scale = torch.exp(log_s).to(producer.weight.dtype)
    with torch.no_grad():
        producer.weight.mul_(scale[:, None])
        if producer.bias is not None:
            producer.bias.mul_(scale)
        consumer.weight.div_(scale[None, :])
    return copied


def add_dummy_units(model: nn.Module, task: Task, *, count: int, mode: str = "random",
                    seed: int = 0) -> nn.Module:
    """Widen the key layer by `count` units scattered among the real ones.

    mode "random": dummies get random incoming weights (so they look alive) and zero
    outgoing weights. mode "zero": dummies never fire (zero incoming weights and bias, so
    ReLU keeps them at 0) and get random outgoing weights, which look used. mode "split":
    each dummy duplicates a real unit and takes a random share of its outgoing weights,
    which no zero-column check can spot.
    """
    if mode not in DUMMY_MODES:
        raise ValueError(f"mode must be one of {DUMMY_MODES}, got {mode!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    copied = copy.deepcopy(model)
    producer, consumer = linear(copied, task.producer), linear(copied, task.consumer)
    units = producer.out_features
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(units + count, generator=generator)
    real, dummy = slots[:units], slots[units:]
    wide_in = nn.Linear(producer.in_features, units + count, bias=producer.bias is not None)
    wide_out = nn.Linear(units + count, consumer.out_features, bias=consumer.bias is not None)
    with torch.no_grad():
        w_in = torch.empty(units + count, producer.in_features, dtype=producer.weight.dtype)
        b_in = torch.zeros(units + count, dtype=producer.weight.dtype)
        w_out = torch.zeros(consumer.out_features, units + count, dtype=consumer.weight.dtype)
        w_in[real], w_out[:, real] = producer.weight, consumer.weight
        if producer.bias is not None:
            b_in[real] = producer.bias
        if mode == "random":
            w_in[dummy] = torch.randn(count, producer.in_features, generator=generator) * producer.weight.std()
            b_in[dummy] = b_in[real].mean()
        elif mode == "zero":
            w_in[dummy] = 0.0
            w_out[:, dummy] = (torch.randn(consumer.out_features, count, generator=generator)
                               * consumer.weight.std())
        else:
            source = real[torch.randint(units, (count,), generator=generator)]
            share = torch.rand(count, generator=generator)
            w_in[dummy], b_in[dummy] = w_in[source], b_in[source]
            for d, s, t in zip(dummy.tolist(), source.tolist(), share.tolist(), strict=True):
                w_out[:, d] = w_out[:, s] * t
                w_out[:, s] *= 1.0 - t
        wide_in.weight.copy_(w_in)
        wide_out.weight.copy_(w_out)
        if wide_in.bias is not None:
            wide_in.bias.copy_(b_in)
        if wide_out.bias is not None and consumer.bias is not None:
            wide_out.bias.copy_(consumer.bias)
    replace(copied, task.producer, wide_in)
    replace(copied, task.consumer, wide_out)
    return copied
