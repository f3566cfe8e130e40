"""Real models for the scheme tests, trained here on real data and cached under
`.cache/test-models/` by `build_cache` (every pytest worker and later run reuses them; a
change to the recipe or to the lab's training code rebuilds them).

Stolen copies come from the robustness lab's attack functions (one implementation): the four
the scheme issue names are fine-tuning, 50 % magnitude pruning, fp16 and int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

from torch import nn

from build_cache import cached_module, lab_training_code
from freemark_lab.attacks.finetune import finetune
from freemark_lab.attacks.prune import magnitude_prune
from freemark_lab.attacks.quantize import fp16 as fp16_attack
from freemark_lab.attacks.quantize import int8 as int8_attack
from freemark_lab.data import Dataset
from freemark_lab.tasks import ImageTask, image_task


@dataclass(frozen=True)
class Recipe:
    """Training budget of a task's host and its fine-tuned copy."""

    epochs: int
    finetune_epochs: int


RECIPES = {"digits": Recipe(epochs=30, finetune_epochs=20), "mnist": Recipe(epochs=8, finetune_epochs=5)}


@dataclass(frozen=True)
class Task:
    name: str
    lab: ImageTask
    recipe: Recipe

    @property
    def dataset(self) -> Dataset:
        return self.lab.dataset


@cache
def task(name: str) -> Task:
    return Task(name, image_task(name), RECIPES[name])


def _cached_model(name: str, label: str, parts: dict[str, object], make: Callable[[], nn.Module]
                  ) -> nn.Module:
    every = {"task": name, "recipe": asdict(task(name).recipe), "code": lab_training_code(), **parts}
    return cached_module(f"{name}-{label}", every, make,
                         lambda: task(name).lab.new_model("same", 0))


def _trained(name: str, seed: int) -> nn.Module:
    t = task(name)
    return _cached_model(name, f"seed{seed}", {"seed": seed}, lambda: t.lab.fit(
        t.lab.new_model("same", seed), epochs=t.recipe.epochs, lr=1e-3, seed=seed))


@cache
def host(name: str) -> nn.Module:
    return _trained(name, 1)


@cache
def independent(name: str, seed: int) -> nn.Module:
    return _trained(name, 100 + seed)


def finetuned(name: str) -> nn.Module:
    t = task(name)
    return _cached_model(name, "finetuned", {"of": "seed1", "seed": 7}, lambda: finetune(
        host(name), t.lab, epochs=t.recipe.finetune_epochs, lr=1e-3, seed=7))


def pruned(name: str) -> nn.Module:
    return magnitude_prune(host(name), task(name).lab, rate=0.5)


def fp16(name: str) -> nn.Module:
    return fp16_attack(host(name), task(name).lab)


def int8(name: str) -> nn.Module:
    return int8_attack(host(name), task(name).lab)
