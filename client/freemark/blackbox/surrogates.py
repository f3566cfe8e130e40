"""The owner's quick thefts of his own host, made from the host and the owner's data.

Queries derived against the host alone are adversarial examples of that one set of weights:
a thief's fine-tune or distillation moves the decision boundary and forgets them. Deriving
them so that the owner's own thefts answer as the host does too keeps, among the inputs the
host and an independent model disagree on, those a stolen copy still agrees on. The recipes
(`DEFAULT_RECIPES`), each cheap enough for a laptop:

- two distillations (temperature 4 and 2, different seeds): a fresh student of the host's
  architecture trained on the host's softened outputs over the owner's images;
- a top-1-label student: a fresh student trained on the host's labels only (what an API
  that returns labels gives a thief);
- a large-learning-rate fine-tune (lr 3e-3) of the host itself on the owner's labelled data.

A fresh student is the host's own graph with every parameter re-drawn (torch's default
initialisation rule: uniform in ±1/√fan-in), so the recipes work on any model program,
not only on architectures this library knows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["DEFAULT_RECIPES", "Recipe", "evaluating", "fresh_copy", "make_one", "make_surrogates",
           "train_on"]

BATCH = 128


@dataclass(frozen=True)
class Recipe:
    """How one surrogate is made; kind is "distill", "labels" or "finetune"."""

    kind: str
    epochs: int
    lr: float = 1e-3
    temperature: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        """A short label for progress bars and the key's parameters."""
        extra = f" T={self.temperature:g}" if self.kind == "distill" else ""
        return f"{self.kind}{extra} lr={self.lr:g} {self.epochs} ep seed {self.seed}"

    def as_dict(self) -> dict[str, float | int | str]:
        """What the key records about it."""
        return asdict(self)


DEFAULT_RECIPES = (
    Recipe("distill", epochs=3, temperature=4.0, seed=1),
    Recipe("distill", epochs=3, temperature=2.0, seed=2),
    Recipe("labels", epochs=3, seed=3),
    Recipe("finetune", epochs=1, lr=3e-3, seed=4),
)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same graph with every parameter re-drawn: a student of the host's architecture."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if param.dim() > 1:
                fan_in = param[0].numel()
            elif name.endswith("bias") and params.get(name[:-4] + "weight") is not None \
                    and params[name[:-4] + "weight"].dim() > 1:
                fan_in = params[name[:-4] + "weight"][0].numel()
            else:  # a normalisation layer's scale or shift
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            bound = 1.0 / math.sqrt(fan_in)
            param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
    return student


def evaluating(model: nn.Module) -> nn.Module:
    """`model` in eval mode; an exported program's module stays in the mode it was exported
    in (torch refuses `eval()` on it), which for a deployed model is already inference."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def _logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 512])) for i in range(0, len(x), 512)])


def train_on(model: nn.Module, x: np.ndarray, targets: torch.Tensor,
             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int,
             lr: float, seed: int, label: str = "", progress: bool = False) -> nn.Module:
    """Adam on `loss(model(x[batch]), targets[batch])`, seeded: the one training loop of the
    recipes (and of the lab's thefts that follow them)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(inputs) / BATCH)
    with tqdm(total=steps, desc=label, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), BATCH):
                index = order[start:start + BATCH]
                optimiser.zero_grad()
                loss(model(inputs[index]), targets[index]).backward()
                optimiser.step()
                bar.update()
    return model


def _distillation_loss(temperature: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits / temperature, dim=1)
        return nn.functional.kl_div(log_probs, soft, reduction="batchmean") * temperature ** 2
    return loss


def make_one(host: nn.Module, recipe: Recipe, x: np.ndarray, y: np.ndarray | None, *,
             progress: bool = False) -> nn.Module:
    """One surrogate by `recipe` from the host and the owner's images `x` (labels `y` are
    needed by the fine-tune only)."""
    logits = _logits(host, x)
    if recipe.kind == "distill":
        model = fresh_copy(host, recipe.seed)
        targets = torch.softmax(logits / recipe.temperature, dim=1)
        loss = _distillation_loss(recipe.temperature)
    elif recipe.kind == "labels":
        model, targets = fresh_copy(host, recipe.seed), logits.argmax(dim=1)
        loss = nn.functional.cross_entropy
    elif recipe.kind == "finetune":
        if y is None:
            raise ValueError("a fine-tune surrogate needs the owner's labels")
        model, targets = copy.deepcopy(host), torch.from_numpy(np.asarray(y, dtype=np.int64))
        loss = nn.functional.cross_entropy
    else:
        raise ValueError(f"unknown surrogate kind {recipe.kind!r}")
    return evaluating(train_on(model, x, targets, loss, epochs=recipe.epochs, lr=recipe.lr,
                               seed=recipe.seed, label=recipe.name, progress=progress))


def make_surrogates(host: nn.Module, x: np.ndarray, y: np.ndarray | None, *,
                    recipes: Sequence[Recipe] = DEFAULT_RECIPES,
                    progress: bool = False) -> list[nn.Module]:
    """Every recipe's surrogate; the host is not changed (fine-tunes train a copy)."""
    torch.manual_seed(0)
    made = []
    for recipe in tqdm(recipes, desc="owner's thefts", disable=not progress):
        made.append(make_one(host, recipe, x, y, progress=progress))
    return made
