"""Combined attacks: a thief chains cheap steps (prune then fine-tune, permute then fine-tune).

Chains are data (a list of `{kind = ..., params...}` steps in the config), so a new
combination needs no code, and each step is the same function the single attacks use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from freemark_lab.tasks import Task


def combine(model: nn.Module, task: Task, *, steps: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply each step's attack to the previous step's output, in order."""
    from freemark_lab.attacks import apply_attack  # the registry imports this module

    if not steps:
        raise ValueError("a combined attack needs at least one step")
    for step in steps:
        params = {k: v for k, v in step.items() if k != "kind"}
        model = apply_attack(str(step["kind"]), model, task, params)
    return model
