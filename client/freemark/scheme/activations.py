"""Read one layer's activations on the trigger set, pooled to one vector per input.

Works the same for an `nn.Module` and for a `torch.export` program (unflattened, so
layer names are the module qualified names `named_modules()` gives for both). The
model is only run forward under `no_grad`; no weight is touched.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
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


def _batches(inputs: torch.Tensor, mask: torch.Tensor | None, chunk: int, *, pad: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """(batch, its mask, how many of its rows are real) per `chunk` inputs; with `pad` (a
    program exported with a fixed batch) the last batch is filled up by repeating its last row."""
    for start, stop in _chunks(len(inputs), chunk):
        batch, batch_mask = inputs[start:stop], None if mask is None else mask[start:stop]
        real = stop - start
        if real < chunk and pad:
            fill = chunk - real
            batch = torch.cat([batch, batch[-1:].expand(fill, *batch.shape[1:])])
            if batch_mask is not None:
                batch_mask = torch.cat([batch_mask, batch_mask[-1:].expand(fill, -1)])
        yield batch, batch_mask, real


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
        if output.shape[1] != mask.shape[1]:  # e.g. a language model's last-position logits
            raise InvalidInputError(f"layer output {tuple(output.shape)} does not have the "
                                    f"inputs' {mask.shape[1]} tokens")
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
            for batch, batch_mask, real in _batches(inputs, mask, chunk,
                                                    pad=bool(_static_batch(module))):
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


def output_scores(model: nn.Module | torch.export.ExportedProgram, inputs: np.ndarray, *,
                  batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """The model's answers on `inputs` as a prediction API gives them: (n, classes) float32
    log-probabilities of its first output.

    The one reading of a model's outputs, for an owner's local responder and the key server's
    sandbox child alike, so a verdict on a file and on an endpoint read the same numbers.
    Inputs go in with their own dtype (uint8 pixels stay uint8, as an image API takes them;
    the model converts them as it was written to). Log-softmax, not softmax: a float32
    softmax underflows to ties far down the ranking, its logarithm keeps the order.
    """
    module = as_module(model)
    # torch takes no read-only memory; a key's arrays are views of its decrypted bytes
    # (`freemark.blackbox.archive`), copied here only when they are.
    batch = torch.from_numpy(np.require(np.ascontiguousarray(inputs), requirements="W"))
    if batch.dim() < 1 or len(batch) == 0:
        raise InvalidInputError("no inputs to answer")
    static = _static_batch(module)
    chunk = static or _batch_for(batch, batch_size)
    answers: list[torch.Tensor] = []
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            for part, _, real in _batches(batch, None, chunk, pad=bool(static)):
                try:
                    logits = _first_tensor(module(part))
                except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                    raise InvalidInputError(
                        f"the model cannot run on inputs of shape {tuple(batch.shape[1:])} "
                        f"{batch.dtype}: {str(exc).splitlines()[0]}") from exc
                if logits.dim() != 2 or logits.shape[0] != len(part) or logits.shape[1] < 2:
                    raise InvalidInputError(f"the model's output has shape "
                                            f"{tuple(logits.shape)}, expected (batch, classes)")
                answers.append(torch.log_softmax(logits.float(), dim=1)[:real])
    finally:
        module.train(was_training)
    scores = torch.cat(answers).numpy()
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError("the model's output scores are not finite")
    return scores


# `capture_every` (the key server's prior-claim scan) reads every intermediate tensor of a
# model; these caps bound what one scan may hand back. Past either, the scan raises: the key
# server treats a scan it cannot complete as a claim, never as a clearance.
MAX_SCANNED_TENSORS = 2048
MAX_SCANNED_VALUES = 48 * 1024**2  # float32 on the wire: 192 MiB


def accepts(model: nn.Module | torch.export.ExportedProgram, triggers: TriggerSet) -> bool:
    """Whether the model takes inputs of the triggers' kind at all: one per sample of their
    shape and dtype (float or integer), with an attention mask exactly when they have one.

    Decided without the trigger values, so the answer says nothing about them. A program
    answers from its declared input signature (static sizes must be equal, dynamic ones
    within their declared range; the batch axis is free); any other module (an allow-listed
    architecture, not an uploaded graph) from a forward pass on zeros of that shape.
    """
    expected = 1 if triggers.attention_mask is None else 2
    samples = [triggers.inputs] + ([] if triggers.attention_mask is None else [triggers.attention_mask])
    if isinstance(model, torch.export.ExportedProgram):
        declared = [n.meta.get("val") for n in model.graph.nodes
                    if n.op == "placeholder" and n.name in set(model.graph_signature.user_inputs)]
        if len(declared) != expected:
            return False
        return all(_fits(value, sample, model.range_constraints)
                   for value, sample in zip(declared, samples))
    try:
        zeros = [torch.zeros((1, *s.shape[1:]), dtype=_to_tensor(s[:1]).dtype) for s in samples]
        if len(zeros) == 2:
            zeros[1] = torch.ones_like(zeros[1])
        module = as_module(model)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                module(*zeros)
        finally:
            module.train(was_training)
    except Exception:  # noqa: BLE001 - a model that cannot run on this shape does not take it
        return False
    return True


def _fits(value: Any, sample: np.ndarray, ranges: dict[Any, Any]) -> bool:
    """Whether one declared input (a fake tensor from the program's graph) admits `sample`."""
    if not isinstance(value, torch.Tensor) or value.dim() != sample.ndim:
        return False
    if value.dtype.is_floating_point != bool(np.issubdtype(sample.dtype, np.floating)):
        return False
    for declared, size in zip(list(value.shape)[1:], sample.shape[1:]):
        if isinstance(declared, int):
            if declared != size:
                return False
            continue
        bound = ranges.get(declared.node.expr)
        if bound is not None and not int(bound.lower) <= size <= int(bound.upper):
            return False
    return True


def capture_every(
    model: nn.Module | torch.export.ExportedProgram,
    triggers: TriggerSet,
    *,
    width: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> list[tuple[str, np.ndarray]]:
    """Pooled activations of every intermediate tensor the model computes on the triggers,
    whatever its modules and weights are called: a list of (name, (n_triggers, units)
    float32 matrix), in the order they are computed, of `width` units only (0: any width).
    The name is the graph node's for a program, the module's otherwise: what says which
    tensor a verdict read, not how the key server finds it.

    What the key server reads an upload with when it looks for another owner's key layer in
    it (`freemark_keyserver.handlers.register`): a program is run node by node, so a key
    layer renamed, wrapped in a container or inlined as a function is still read; any other
    module through a hook on every submodule. Each tensor is pooled by its rank (2-D as it
    is, token mean with a mask, spatial mean otherwise); one whose batch axis is not the
    inputs' or that cannot be pooled is left out; one that is not finite comes back as
    zeros, which no key reads. Empty when the model
    does not take inputs of the triggers' kind (`accepts`). Raises InvalidInputError when the
    model cannot run on the triggers, or the scan exceeds MAX_SCANNED_TENSORS or
    MAX_SCANNED_VALUES. One set of `capture_every_sets`.
    """
    (scanned,) = capture_every_sets(model, [triggers], width=width, batch_size=batch_size)
    if isinstance(scanned, InvalidInputError):
        raise scanned
    return scanned


def capture_every_sets(
    model: nn.Module | torch.export.ExportedProgram,
    sets: Sequence[TriggerSet],
    *,
    width: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> list[list[tuple[str, np.ndarray]] | InvalidInputError]:
    """`capture_every` of several trigger sets of one input kind in one forward pass: per
    set, what `capture_every` would list for it alone, or the InvalidInputError its run
    raised.

    Why (issue 21): Register scans an upload on the triggers of every candidate earlier
    registration; one pass over all of them, batched together, costs about what one set
    costs, where a pass per set made a Register's time grow with the candidates. The sets'
    inputs are concatenated and read in the batches `capture_every` would use, and each
    set's rows are split back out. What one set gets depends on its own rows only: which
    tensors are kept is decided by shapes (one decision for all sets, as for one); a tensor
    not finite on a set's rows is zeros for that set alone; a batch the model fails on
    fails the sets with rows in it, and the pass goes on over the rest, so the others'
    answers are intact and the pass costs the same whether a set failed or not. The caps
    are per set (the largest set's rows); past one, every set's scan fails, raised here.
    Raises ValueError when the sets are not of one input kind (sample shape, dtype, mask).
    """
    if not sets:
        return []
    first = sets[0]
    if any(not _same_kind(first, other) for other in sets[1:]):
        raise ValueError("capture_every_sets takes trigger sets of one input kind")
    if not accepts(model, first):
        return [[] for _ in sets]
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    module = program.module() if program is not None else as_module(model)
    inputs = _to_tensor(np.concatenate([s.inputs for s in sets]))
    mask = (None if first.attention_mask is None
            else _to_tensor(np.concatenate([s.attention_mask for s in sets  # type: ignore[misc]
                                            ])))
    bounds = np.cumsum([0, *(len(s) for s in sets)])
    segments = list(itertools.pairwise(int(b) for b in bounds))
    largest = max(len(s) for s in sets)
    chunk = _static_batch(module) or _batch_for(inputs, batch_size)
    scan = TensorScan(width=width, has_mask=mask is not None)
    forward = (_node_recorder(module, scan.record) if program is not None
               else _hook_recorder(module, scan.record))
    failed: list[tuple[int, int, Exception]] = []  # rows of a batch the model failed on
    was_training = module.training
    try:
        if program is None:  # a program's graph was exported in eval mode and has no train()
            module.eval()
        with torch.no_grad():
            for batch, batch_mask, real in _batches(inputs, mask, chunk,
                                                    pad=bool(_static_batch(module))):
                scan.start(len(batch), real, batch_mask)
                try:
                    forward(batch, batch_mask)
                except InvalidInputError:
                    raise
                except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as exc:
                    failed.append((scan.offset, scan.offset + real, exc))
                    scan.discard()
                    continue
                if scan.units_per_row() * largest > MAX_SCANNED_VALUES:
                    raise InvalidInputError(f"the scan exceeds {MAX_SCANNED_VALUES} values")
    finally:
        if program is None:
            module.train(was_training)
    answers: list[list[tuple[str, np.ndarray]] | InvalidInputError] = []
    for (begin, end), scanned in zip(segments, scan.results(segments), strict=True):
        fault = next((exc for lo, hi, exc in failed if lo < end and begin < hi), None)
        if fault is None:
            answers.append(scanned)
            continue
        error = InvalidInputError(
            f"the model cannot run on the trigger inputs of shape "
            f"{tuple(inputs.shape[1:])} per sample: {str(fault).splitlines()[0]}")
        error.__cause__ = fault
        answers.append(error)
    return answers


def _same_kind(one: TriggerSet, other: TriggerSet) -> bool:
    """Whether two trigger sets can be read in one batch: the same sample shape and dtype,
    and a mask of the same length exactly when one has a mask."""
    if (one.inputs.shape[1:] != other.inputs.shape[1:]
            or one.inputs.dtype != other.inputs.dtype):
        return False
    if one.attention_mask is None or other.attention_mask is None:
        return one.attention_mask is None and other.attention_mask is None
    return (one.attention_mask.shape[1:] == other.attention_mask.shape[1:]
            and one.attention_mask.dtype == other.attention_mask.dtype)


_Forward = Callable[[torch.Tensor, 'torch.Tensor | None'], Any]


class TensorScan:
    """What a scan has read so far (`capture_every`, and an ONNX graph's scan in
    `freemark.formats.onnx`): per tensor (by the order the forward pass computes it in), its
    name and its pooled rows of each batch.

    A tensor is kept when it is floating point with the batch axis first, poolable by its
    rank (`infer_pooling`) and of `width` units (0: any); a tensor named in `always` (one a
    requester asked for) needs only the first two. Its rank is not compared with the key
    layer's: a copy can hold the key layer's values at another rank ((batch, units, 1) pools
    to the same vector). All of these are decided by shapes alone; whether its values are finite is
    decided on the triggers, so such a tensor is kept as zeros (a constant one no key can
    read, of which no claim signature is made) instead of being left out: then which
    tensors a scan lists, how many, and the reply's size say nothing about the trigger
    values (issues 18 and 21)."""

    def __init__(self, *, width: int, has_mask: bool,
                 always: frozenset[str] = frozenset()) -> None:
        self.width, self.has_mask, self.always = width, has_mask, always
        # Per tensor (by order), its pooled rows of each batch read, by the batch's first row.
        self.columns: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.names: dict[int, str] = {}
        self.dropped: set[int] = set()
        self.seen, self.batch, self.real, self.offset, self.read = 0, 0, 0, 0, 0
        self.mask: torch.Tensor | None = None

    def start(self, batch: int, real: int, mask: torch.Tensor | None) -> None:
        """A new batch of `real` rows (padded to `batch`), following the previous one."""
        self.seen, self.batch, self.real, self.mask = 0, batch, real, mask
        self.offset, self.read = self.read, self.read + real

    def discard(self) -> None:
        """Forget what the current batch recorded (the model failed on it): its rows are
        then missing from every tensor, and a set holding one of them has no answer."""
        for parts in self.columns.values():
            while parts and parts[-1][0] == self.offset:
                parts.pop()

    def record(self, output: Any, name: str = "") -> None:
        order, self.seen = self.seen, self.seen + 1
        if order in self.dropped:
            return
        if not (isinstance(output, torch.Tensor) and output.dtype.is_floating_point
                and output.dim() >= 2 and output.shape[0] == self.batch):
            self.dropped.add(order)
            return
        try:
            pooling = infer_pooling(output, self.has_mask)
            # units before any copy: a language model's vocabulary-wide logits are not
            # converted to float64 only to be dropped
            units = output.shape[-1] if pooling != bundle_pb2.POOLING_SPATIAL_MEAN else output.shape[1]
            if self.width and units != self.width and name not in self.always:
                self.dropped.add(order)
                return
            pooled = pool(output.detach().to(torch.float64), self.mask, pooling)
        except (InvalidInputError, RuntimeError):
            self.dropped.add(order)
            return
        self.names.setdefault(order, name)
        self.columns.setdefault(order, []).append((self.offset,
                                                   pooled[:self.real].to(torch.float32)))
        if len(self.columns) > MAX_SCANNED_TENSORS:
            raise InvalidInputError(f"the model computes more than {MAX_SCANNED_TENSORS} "
                                    "tensors to scan")

    def units_per_row(self) -> int:
        return sum(int(parts[0][1].shape[1]) for parts in self.columns.values() if parts)

    def result(self, rows: int) -> list[tuple[str, np.ndarray]]:
        """(name, matrix) of every tensor kept, in the order they were computed."""
        return self.results([(0, rows)])[0]

    def results(self, segments: Sequence[tuple[int, int]]) -> list[list[tuple[str, np.ndarray]]]:
        """Per segment of rows (begin, end): (name, matrix) of every tensor kept that was read
        on all of its rows, in the order they were computed; a matrix that is not finite on
        a segment is zeros for that segment only (one set's rows say nothing of another's)."""
        rows = max((end for _, end in segments), default=0)
        answers: list[list[tuple[str, np.ndarray]]] = [[] for _ in segments]
        for order, parts in self.columns.items():
            if order in self.dropped or not parts:
                continue
            widths = {int(part.shape[1]) for _, part in parts}
            if len(widths) != 1:  # pooled to another width in another batch: not one tensor
                continue
            matrix = np.zeros((rows, widths.pop()), dtype=np.float32)
            covered = np.zeros(rows, dtype=bool)
            for first, part in parts:
                matrix[first:first + len(part)] = part.numpy()
                covered[first:first + len(part)] = True
            for answer, (begin, end) in zip(answers, segments, strict=True):
                if not covered[begin:end].all():
                    continue
                piece = matrix[begin:end]
                answer.append((self.names[order], piece if np.all(np.isfinite(piece))
                               else np.zeros_like(piece)))
        return answers


def _node_recorder(module: nn.Module, record: Callable[[Any, str], None]) -> _Forward:
    """A forward pass over a program's graph that hands every node's output (and the node's
    name) to `record`."""

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            output = super().run_node(n)
            if n.op == "call_function":
                record(output, n.name)
            return output

    def forward(batch: torch.Tensor, mask: torch.Tensor | None) -> Any:
        return Recorder(module).run(*([batch] if mask is None else [batch, mask]))
    return forward


def _hook_recorder(module: nn.Module, record: Callable[[Any, str], None]) -> _Forward:
    """A forward pass that hands every submodule's output (the first tensor of a tuple), and
    its qualified name, to `record`."""

    def hook(name: str, _mod: nn.Module, _inp: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0] if output and isinstance(output[0], torch.Tensor) else None
        record(output, name)

    def forward(batch: torch.Tensor, mask: torch.Tensor | None) -> Any:
        handles = [m.register_forward_hook(functools.partial(hook, name))
                   for name, m in module.named_modules()]
        try:
            return module(batch) if mask is None else module(batch, mask)
        finally:
            for handle in handles:
                handle.remove()
    return forward
