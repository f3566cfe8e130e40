"""Read one layer's activations on the trigger set, pooled to one vector per input.

Works the same for an `nn.Module` and for a `torch.export` program (unflattened, so
layer names are the module qualified names `named_modules()` gives for both). The
model is only run forward under `no_grad`; no weight is touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from freemark.errors import InvalidInputError
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2

Pooling = int  # a bundle_pb2.Pooling value
MAX_LISTED_LAYERS = 200
DEFAULT_BATCH = 256
# Inputs per forward pass are capped by size too. At 224 x 224, 256 inputs make each of
# EfficientNet-Lite0's first layers a 0.4-1.2 GB tensor: the sandbox's 4 GiB address space
# refused the model, and tensors that large are fresh mmaps, page-faulted anew at every layer
# (two thirds of the CPU time at 256 inputs a pass, none at 4: bench/keyserver.py). 2 MiB
# leaves 8 x 8 digits, MNIST and token triggers at 256 inputs a pass.
BATCH_INPUT_BYTES = 2 * 1024**2


def as_module(model: nn.Module | torch.export.ExportedProgram) -> nn.Module:
    """An `nn.Module` view of the model; programs are unflattened to keep module names."""
    if isinstance(model, torch.export.ExportedProgram):
        return torch.export.unflatten(model)
    if isinstance(model, nn.Module):
        return model
    raise InvalidInputError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")


def layer_names(module: nn.Module) -> list[str]:
    """Every addressable layer name (the root, '', excluded)."""
    return [name for name, _ in module.named_modules() if name]


def resolve_layer(module: nn.Module, layer: str) -> nn.Module:
    """The submodule called `layer`, or a clear error listing the valid names."""
    modules = dict(module.named_modules())
    if layer and layer in modules:
        return modules[layer]
    names = layer_names(module)
    shown = ", ".join(names[:MAX_LISTED_LAYERS])
    more = f" (and {len(names) - MAX_LISTED_LAYERS} more)" if len(names) > MAX_LISTED_LAYERS else ""
    raise InvalidInputError(f"no layer named {layer!r}; valid layers: {shown}{more}")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    raise InvalidInputError(f"trigger inputs must be numeric, got dtype {array.dtype}")


def _static_batch(module: nn.Module) -> int | None:
    """The fixed batch size an exported program was traced with, or None if dynamic."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                size = value.shape[0]
                return int(size) if isinstance(size, int) else None
    return None


def _batch_for(inputs: torch.Tensor, batch_size: int) -> int:
    """Inputs per forward pass: `batch_size`, fewer when they would exceed BATCH_INPUT_BYTES."""
    per_input = max(1, inputs[0].numel() * inputs.element_size())
    return max(1, min(batch_size, BATCH_INPUT_BYTES // per_input))


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def pool(output: torch.Tensor, mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """Reduce a layer output to (batch, units) as the bundle's pooling says."""
    if pooling == bundle_pb2.POOLING_NONE:
        if output.dim() != 2:
            raise InvalidInputError(f"layer output has shape {tuple(output.shape)}, expected 2-D")
        return output
    if pooling == bundle_pb2.POOLING_SPATIAL_MEAN:
        if output.dim() < 3:
            raise InvalidInputError(f"layer output {tuple(output.shape)} has no spatial axes")
        return output.flatten(2).mean(dim=2)
    if pooling == bundle_pb2.POOLING_TOKEN_MEAN:
        if output.dim() != 3:
            raise InvalidInputError(f"layer output {tuple(output.shape)} is not (batch, tokens, units)")
        if mask is None:
            return output.mean(dim=1)
        weights = mask.to(output.dtype).unsqueeze(-1)
        return (output * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    raise InvalidInputError(f"unknown pooling {pooling}")


def infer_pooling(output: torch.Tensor, has_mask: bool) -> Pooling:
    """Pick the pooling for a layer from its output rank (and whether inputs are tokens)."""
    if output.dim() == 2:
        return bundle_pb2.POOLING_NONE
    if has_mask and output.dim() == 3:
        return bundle_pb2.POOLING_TOKEN_MEAN
    if output.dim() >= 3:
        return bundle_pb2.POOLING_SPATIAL_MEAN
    raise InvalidInputError(f"cannot pool a layer output of shape {tuple(output.shape)}")


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidInputError(f"layer output is a {type(output).__name__}, not a tensor")


def capture(
    model: nn.Module | torch.export.ExportedProgram,
    layer: str,
    triggers: TriggerSet,
    *,
    pooling: Pooling | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> tuple[np.ndarray, Pooling]:
    """Pooled activations of `layer` on every trigger: ((n_triggers, units) float64, pooling).

    `pooling=None` infers it from the output; pass the bundle's pooling when extracting so
    a suspect whose layer changed shape is refused instead of silently pooled differently.
    A forward pass reads at most `batch_size` inputs and BATCH_INPUT_BYTES of them (a program
    exported with a fixed batch reads exactly that many).
    """
    module = as_module(model)
    target = resolve_layer(module, layer)
    inputs = _to_tensor(triggers.inputs)
    mask = None if triggers.attention_mask is None else _to_tensor(triggers.attention_mask)
    chunk = _static_batch(module) or _batch_for(inputs, batch_size)
    captured: list[torch.Tensor] = []
    chosen: list[Pooling] = [] if pooling is None else [pooling]

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
        tensor = _first_tensor(output).detach().to(torch.float64)
        if not chosen:
            chosen.append(infer_pooling(tensor, mask is not None))
        captured.append(tensor)

    was_training = module.training
    handle = target.register_forward_hook(hook)
    pooled: list[torch.Tensor] = []
    try:
        module.eval()
        with torch.no_grad():
            for start, stop in _chunks(len(inputs), chunk):
                batch, batch_mask = inputs[start:stop], None if mask is None else mask[start:stop]
                real = stop - start
                if real < chunk and _static_batch(module):
                    pad = chunk - real
                    batch = torch.cat([batch, batch[-1:].expand(pad, *batch.shape[1:])])
                    if batch_mask is not None:
                        batch_mask = torch.cat([batch_mask, batch_mask[-1:].expand(pad, -1)])
                captured.clear()
                try:
                    module(batch) if batch_mask is None else module(batch, batch_mask)
                except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                    raise InvalidInputError(
                        f"the model cannot run on the trigger inputs of shape "
                        f"{tuple(inputs.shape[1:])} per sample: {str(exc).splitlines()[0]}"
                    ) from exc
                if not captured:
                    raise InvalidInputError(f"layer {layer!r} did not run in the forward pass")
                pooled.append(pool(captured[0], batch_mask, chosen[0])[:real])
    finally:
        handle.remove()
        module.train(was_training)
    result = torch.cat(pooled).numpy()
    if not np.all(np.isfinite(result)):
        raise InvalidInputError(f"layer {layer!r} produced non-finite activations")
    return result, chosen[0]
