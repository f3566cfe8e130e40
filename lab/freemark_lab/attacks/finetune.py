"""Fine-tuning attacks: the cheapest removal attempt, and the one every thief tries first.

`scope="last"` moves only the classifier head (the key layer is frozen, so this probes
whether the verdict is tied to the head at all); `scope="all"` moves every weight, and a
large learning rate walks the weights far from the host. `fresh_head` re-initialises the
head first, as a thief re-purposing the model for his own label set would.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from freemark_lab.attacks.layers import module
from freemark_lab.tasks import Task

SCOPES = ("all", "last")


def finetune(model: nn.Module, task: Task, *, epochs: int, lr: float, scope: str = "all",
             seed: int = 0) -> nn.Module:
    """A copy of `model` trained further on the task's data; `scope` picks which weights move."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    copied = copy.deepcopy(model)
    params = list(module(copied, task.head).parameters()) if scope == "last" else None
    return task.fit(copied, epochs=epochs, lr=lr, seed=seed, params=params)


def fresh_head(model: nn.Module, task: Task, *, epochs: int, lr: float, scope: str = "all",
               seed: int = 0) -> nn.Module:
    """A copy with a re-initialised classifier head, then fine-tuned like `finetune`."""
    copied = copy.deepcopy(model)
    head = module(copied, task.head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the head {task.head!r} is not nn.Linear")
    with torch.random.fork_rng():  # seeded re-initialisation without disturbing the caller's RNG
        torch.manual_seed(seed)
        head.reset_parameters()
    return finetune(copied, task, epochs=epochs, lr=lr, scope=scope, seed=seed)
