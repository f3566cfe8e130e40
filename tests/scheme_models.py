"""Real models for the scheme tests, trained here on real data and cached per session.

Stolen copies are made with the lab's attack functions where they exist; the copies
below are the four the scheme issue names (fine-tune, 50 % pruning, fp16, int8).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from freemark.lab import data, models, train


@dataclass(frozen=True)
class Task:
    """A dataset with its architecture and training budget."""

    name: str
    dataset: data.Dataset
    architecture: type[nn.Module]
    epochs: int
    finetune_epochs: int


@cache
def task(name: str) -> Task:
    if name == "digits":
        return Task("digits", data.digits(), models.DigitsCNN, epochs=30, finetune_epochs=20)
    return Task("mnist", data.mnist_subset(), models.MnistCNN, epochs=8, finetune_epochs=5)


@cache
def host(name: str) -> nn.Module:
    t = task(name)
    return train.trained(t.architecture, t.dataset.x_train, t.dataset.y_train, epochs=t.epochs, seed=1)


@cache
def independent(name: str, seed: int) -> nn.Module:
    t = task(name)
    return train.trained(t.architecture, t.dataset.x_train, t.dataset.y_train, epochs=t.epochs,
                         seed=100 + seed)


def finetuned(name: str) -> nn.Module:
    t = task(name)
    copy_ = copy.deepcopy(host(name))
    return train.train(copy_, t.dataset.x_train, t.dataset.y_train, epochs=t.finetune_epochs,
                       lr=1e-3, seed=7)


def pruned(name: str, rate: float = 0.5) -> nn.Module:
    copy_ = copy.deepcopy(host(name))
    weights = [m.weight for m in copy_.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(rate)
    with torch.no_grad():
        for w in weights:
            w[w.abs() <= threshold] = 0.0
    return copy_


def fp16(name: str) -> nn.Module:
    return copy.deepcopy(host(name)).half().float()


def int8(name: str) -> nn.Module:
    copy_ = copy.deepcopy(host(name))
    with torch.no_grad():
        for p in copy_.parameters():
            scale = p.abs().max().clamp_min(1e-12) / 127.0
            p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return copy_
