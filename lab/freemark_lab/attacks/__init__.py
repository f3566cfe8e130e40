"""The attack suite: one function per attack, `(model, task, **params) -> new model`.

Every attack works on a deep copy and never modifies the host. `ATTACKS` maps the names
used in the TOML configs to the functions; `apply_attack` is what the runner calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from freemark_lab.attacks.combine import combine
from freemark_lab.attacks.distill import distill
from freemark_lab.attacks.finetune import finetune, fresh_head
from freemark_lab.attacks.noise import gaussian_noise
from freemark_lab.attacks.obfuscate import add_dummy_units, permute_units, rescale_units
from freemark_lab.attacks.prune import magnitude_prune, structured_prune
from freemark_lab.attacks.quantize import fp16, int8
from freemark_lab.tasks import Task

Attack = Callable[..., nn.Module]

ATTACKS: dict[str, Attack] = {
    "combine": combine,
    "distill": distill,
    "dummy_units": add_dummy_units,
    "finetune": finetune,
    "fp16": fp16,
    "fresh_head": fresh_head,
    "int8": int8,
    "magnitude_prune": magnitude_prune,
    "noise": gaussian_noise,
    "permute": permute_units,
    "rescale": rescale_units,
    "structured_prune": structured_prune,
}

# Attacks that change nothing a user of the model can observe: the report checks them
# against this list and the tests assert identical logits.
FUNCTION_PRESERVING = frozenset({"permute", "rescale", "dummy_units"})


def apply_attack(kind: str, model: nn.Module, task: Task, params: Mapping[str, Any]) -> nn.Module:
    """Run the attack called `kind` on a copy of `model`; unknown names list the valid ones."""
    if kind not in ATTACKS:
        raise KeyError(f"unknown attack {kind!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[kind](model, task, **dict(params))


__all__ = ["ATTACKS", "FUNCTION_PRESERVING", "Attack", "apply_attack"]
