"""Training and evaluation loops, small enough for a 2-core CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, params: list[nn.Parameter] | None = None) -> nn.Module:
    """Adam on cross-entropy, seeded; `params` restricts which weights move (fine-tune attacks)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            index = order[start:start + batch_size]
            optimiser.zero_grad()
            loss_fn(model(inputs[index]), labels[index]).backward()
            optimiser.step()
    model.eval()
    return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i:i + 512])) for i in range(0, len(x), 512)])
    return float((logits.argmax(dim=1).numpy() == y).mean())


def trained(architecture: type[nn.Module], x: np.ndarray, y: np.ndarray, *, epochs: int,
            seed: int, lr: float = 1e-3) -> nn.Module:
    """A freshly initialised model of `architecture`, trained with everything seeded by `seed`."""
    torch.manual_seed(seed)
    return train(architecture(), x, y, epochs=epochs, lr=lr, seed=seed)


def distill(student: nn.Module, teacher: nn.Module, x: np.ndarray, *, epochs: int,
            lr: float = 1e-3, temperature: float = 4.0, batch_size: int = 64,
            seed: int = 0) -> nn.Module:
    """Train `student` to match `teacher`'s softened outputs on unlabelled inputs `x`.

    The distillation attack: a thief with the model and unlabelled data copies its function
    into fresh weights, which keep none of the host's activations by construction.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(x)
    teacher.eval()
    with torch.no_grad():
        targets = torch.cat([torch.softmax(teacher(inputs[i:i + 512]) / temperature, dim=1)
                             for i in range(0, len(inputs), 512)])
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            index = order[start:start + batch_size]
            optimiser.zero_grad()
            log_probs = torch.log_softmax(student(inputs[index]) / temperature, dim=1)
            loss = nn.functional.kl_div(log_probs, targets[index], reduction="batchmean")
            (loss * temperature ** 2).backward()
            optimiser.step()
    student.eval()
    return student
