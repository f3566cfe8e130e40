"""Finding and swapping the layers attacks operate on, by qualified module name."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase

from torch import nn


def module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, with an error that names the model's layers."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(f"no module {name!r} in {type(model).__name__}")
    return modules[name]


def linear(model: nn.Module, name: str) -> nn.Linear:
    """The `nn.Linear` called `name`; obfuscation attacks only know how to rewrite those."""
    found = module(model, name)
    if not isinstance(found, nn.Linear):
        raise TypeError(f"{name!r} is a {type(found).__name__}, not nn.Linear")
    return found


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was (used to widen a layer)."""
    parent_name, _, child = name.rpartition(".")
    setattr(module(model, parent_name) if parent_name else model, child, new)


def weighted_layers(model: nn.Module, patterns: Sequence[str] = ("*",),
                    exclude: Sequence[str] = ()) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """Linear and Conv2d layers whose names match a glob in `patterns` and none in `exclude`."""
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if any(fnmatchcase(name, p) for p in patterns) and not any(fnmatchcase(name, p) for p in exclude):
            yield name, layer
