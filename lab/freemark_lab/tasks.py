"""What an attack and the robustness runner need to know about a model family.

Attacks are written once against this small interface, so the same fine-tune, prune or
permutation code runs on the digits CNN, the MNIST CNN and MiniLM. A task owns its data
(the attacker is given the owner's training split: the strongest realistic thief), its
training recipe and the names of the layers around the key layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark_lab.data import DATASETS, Dataset
from freemark_lab.models import ARCHITECTURES, STUDENTS
from freemark_lab.train import accuracy, distill, train


class Task(Protocol):
    """A model family with its data, training recipe and the layers an attack touches."""

    layer: str  # the key layer: the elementwise activation after `producer`
    producer: str  # the Linear whose output units are the key layer's units
    consumer: str  # the Linear that reads the key layer
    head: str  # the classifier Linear (fine-tune "last", fresh head)
    positive_homogeneous: bool  # relu(s·x) = s·relu(x): per-unit rescaling is function-preserving

    @property
    def name(self) -> str:
        """Short name used in reports and file names."""
        ...

    def new_model(self, variant: str, seed: int) -> nn.Module:
        """A freshly initialised model; variant "same" or "small" (a distillation student)."""
        ...

    def fit(self, model: nn.Module, *, epochs: int, lr: float, seed: int,
            params: list[nn.Parameter] | None = None) -> nn.Module:
        """Train in place on the task's training split and return the model."""
        ...

    def distill(self, student: nn.Module, teacher: nn.Module, *, epochs: int, lr: float,
                temperature: float, seed: int) -> nn.Module:
        """Train `student` on `teacher`'s soft outputs over the training inputs."""
        ...

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 accuracy on the held-out test split."""
        ...

    def triggers(self, per_class: int, seed: int) -> TriggerSet:
        """The owner's trigger set, at least one sample per class."""
        ...

    def sample_inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        """A few test inputs as positional model arguments (function-preservation checks)."""
        ...


@dataclass
class ImageTask:
    """The digits or MNIST CNN (key layer `act`, the ReLU after `fc1`)."""

    dataset: Dataset
    batch_size: int = 64
    layer: str = "act"
    producer: str = "fc1"
    consumer: str = "fc2"
    head: str = "fc2"
    positive_homogeneous: bool = True

    @property
    def name(self) -> str:
        return self.dataset.name

    def new_model(self, variant: str, seed: int) -> nn.Module:
        factories: dict[str, Callable[[], nn.Module]] = {
            "same": ARCHITECTURES[self.name], "small": STUDENTS[self.name]}
        if variant not in factories:
            raise ValueError(f"unknown architecture variant {variant!r}; use one of {sorted(factories)}")
        torch.manual_seed(seed)
        return factories[variant]()

    def fit(self, model: nn.Module, *, epochs: int, lr: float, seed: int,
            params: list[nn.Parameter] | None = None) -> nn.Module:
        return train(model, self.dataset.x_train, self.dataset.y_train, epochs=epochs, lr=lr,
                     batch_size=self.batch_size, seed=seed, params=params)

    def distill(self, student: nn.Module, teacher: nn.Module, *, epochs: int, lr: float,
                temperature: float, seed: int) -> nn.Module:
        return distill(student, teacher, self.dataset.x_train, epochs=epochs, lr=lr,
                       temperature=temperature, batch_size=self.batch_size, seed=seed)

    def evaluate(self, model: nn.Module) -> float:
        return accuracy(model, self.dataset.x_test, self.dataset.y_test)

    def triggers(self, per_class: int, seed: int) -> TriggerSet:
        return select_triggers(self.dataset.x_train, self.dataset.y_train,
                               per_class=per_class, seed=seed)

    def sample_inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(np.ascontiguousarray(self.dataset.x_test[:n])),)


def image_task(name: str, *, seed: int = 0, batch_size: int = 64) -> ImageTask:
    """The digits or MNIST task with its seeded train/test split."""
    if name not in DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; use one of {sorted(DATASETS)}")
    return ImageTask(DATASETS[name](seed), batch_size=batch_size)
