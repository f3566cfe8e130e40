"""Small reference CNNs for the digits and MNIST tasks; the key layer is `fc1` (post-ReLU `act`)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two conv blocks and a 128-unit hidden layer, for 8×8 digits (≈ 97 % test accuracy)."""

    def __init__(self, hidden: int = 128, width: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(width * 16, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(self.features(x)))))


class MnistCNN(nn.Module):
    """A LeNet-style CNN for 28×28 MNIST with a 256-unit hidden layer."""

    def __init__(self, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 7 * 7, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(self.features(x)))))


ARCHITECTURES = {"digits": DigitsCNN, "mnist": MnistCNN}


class MnistStudentCNN(nn.Module):
    """A quarter-width MnistCNN (4/8 channels) with the same 256-unit key layer.

    The distillation attack's smaller student: keeping the key layer's width lets the
    key be applied at all, so the report measures the watermark rather than a shape error.
    """

    def __init__(self, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8 * 7 * 7, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(self.features(x)))))


def digits_student() -> nn.Module:
    """A quarter-width DigitsCNN (8 conv channels) with the same 128-unit key layer."""
    return DigitsCNN(width=8)


STUDENTS = {"digits": digits_student, "mnist": MnistStudentCNN}
