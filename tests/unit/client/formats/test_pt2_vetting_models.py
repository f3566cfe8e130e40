"""Every model the project registers and verifies passes vetting as a `.pt2` file; a model that
needs an operator off the allow-list is refused with the operator's name.

The files go through `save_program` and `load_program`, the way owners upload and the sandbox
reads them. EfficientNet-Lite0 is the lab's pretrained one (a lab dependency); ccexam's
MNISTNet (ASSETS.md) is checked where installed: it is an input of
scripts/derive_vetting_allowlist.py, not a dependency.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from freemark.errors import ModelFileError
from freemark.formats.pt2 import load_program, save_program
from freemark.formats.pt2_vetting import vet_program
from freemark_lab import models

IMAGES_8 = (torch.zeros(2, 1, 8, 8),)
IMAGES_28 = (torch.zeros(2, 1, 28, 28),)


def _minilm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from freemark_lab.transformer import MAX_TOKENS, TextClassifier, load_minilm

    _, bert = load_minilm()
    mask = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    mask[1, MAX_TOKENS // 2 :] = 0
    return TextClassifier(bert, 4), (torch.arange(2 * MAX_TOKENS).reshape(2, -1), mask)


def _efficientnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from freemark_lab.imagenet import IMAGE_SIZE, load_efficientnet_lite0

    return load_efficientnet_lite0(), (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),)


def _mnistnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from ccexam.models import MNISTNet

    return MNISTNet(28), IMAGES_28


def _installed(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "digits": lambda: (models.DigitsCNN(), IMAGES_8),
    "digits-student": lambda: (models.digits_student(), IMAGES_8),
    "mnist": lambda: (models.MnistCNN(), IMAGES_28),
    "mnist-student": lambda: (models.MnistStudentCNN(), IMAGES_28),
    "minilm": _minilm,
    "efficientnet-lite0": _efficientnet,
    "ccexam-mnistnet": _mnistnet,
}
MARKS = {"ccexam-mnistnet": _installed("ccexam")}


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, ())) for n in MODELS])
def test_project_model_passes_vetting_as_uploaded(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, example = MODELS[name]()
    path = tmp_path / f"{name}.pt2"
    save_program(model, example, path)
    vet_program(load_program(path))


class _Sorts(models.DigitsCNN):
    """Stands for a new architecture that needs an operator no listed model uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.sort(x, dim=-1).values)


def test_a_model_needing_an_unlisted_operator_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "sorts.pt2"
    save_program(_Sorts(), IMAGES_8, path)
    with pytest.raises(ModelFileError, match=r"calls aten::sort.default, which is not on the sandbox's "
                       r"allow-list .*Extending the operator allow-list"):
        vet_program(load_program(path))
