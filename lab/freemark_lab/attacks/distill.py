"""Knowledge distillation: copy the host's function into freshly initialised weights.

The student never sees the host's weights or activations, only its outputs, so a
watermark that lives in the host's hidden activations is not expected to survive; the
report measures it rather than assuming it.
"""

from __future__ import annotations

import copy

from torch import nn

from freemark_lab.tasks import Task


def distill(model: nn.Module, task: Task, *, architecture: str = "same", epochs: int,
            lr: float = 1e-3, temperature: float = 4.0, seed: int = 0) -> nn.Module:
    """A fresh student ("same" or "small" architecture) trained on the host's soft labels."""
    student = task.new_model(architecture, seed)
    return task.distill(student, copy.deepcopy(model), epochs=epochs, lr=lr,
                        temperature=temperature, seed=seed)
