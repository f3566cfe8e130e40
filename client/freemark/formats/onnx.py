"""ONNX suspects: a vetted graph run by onnxruntime, with the key layer's tensor as an output.

A thief may convert a stolen model to ONNX for deployment. An ONNX file is a protobuf, so
nothing is unpickled, but it is still a program: `load_onnx` caps its size before parsing
and `vet_onnx` admits only

- operators of the standard domain (`""` / `ai.onnx`) on an allow-list of the ordinary
  tensor operations exported transformers and CNNs use (`ALLOWED_OPS`): no custom domains
  (`com.microsoft` contrib ops included), no `ai.onnx.ml` (tree ensembles and other
  classical-ML operators a neural network does not need), no control flow (`If`, `Loop`,
  `Scan`: data-dependent control flow is refused as for programs), no random operators;
- no model-local functions, no training info, no sparse initializers;
- no external data at all: every weight must be inside the file (an external-data path
  would make the runtime open a file the uploader chose);
- no index or shape computed from the inputs' values (`INDEX_OPERANDS`: `Slice`'s starts
  and ends, `Reshape`'s and `Expand`'s shape, `GatherND`'s and `Scatter*`'s indices...),
  found by following the graph inputs through every node (`_data_flow`). The indices of
  `Gather` and `GatherElements` computed from them (token ids into an embedding, RoBERTa's
  position ids) are clamped into range instead (`clamp_indices`, applied by `load_onnx`):
  no input value can make the graph fail or change its cost (issue 18).

The session is the CPU provider with no custom-op library registered, one thread,
sequential execution and the runtime's own graph optimisations.

The key layer's tensor is found from the names `torch.onnx.export` (TorchScript exporter,
`dynamo=False`) gives nodes: the module path, slash-separated (`/bert/encoder/layer.3/
intermediate/...`). The layer's output is the one tensor produced inside that scope and
consumed outside it; where there is not exactly one, the caller must name the tensor
(`--onnx-tensor`). The dynamo exporter's node names are not read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError, ModelFileError
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2

__all__ = ["ALLOWED_OPS", "CLAMPED_OPERANDS", "INDEX_OPERANDS", "MAX_ONNX_BYTES", "MAX_TENSOR_NAME",
           "SIZE_OPERATORS", "OnnxModel", "clamp_indices", "layer_tensor", "load_onnx", "vet_onnx"]

MAX_ONNX_BYTES = 2 * 1024**3 - 1  # protobuf's own limit on one message
MAX_NODES = 200_000
MAX_INPUTS = 3  # input ids, attention mask, token type ids (or one image tensor)
STANDARD_DOMAINS = ("", "ai.onnx")
DEFAULT_BATCH = 256
# A tensor's name, as a Verify request may give it and a verdict signs it: longer ones are
# refused by the vetting, so every name a scan answers fits.
MAX_TENSOR_NAME = 1024
# What one pass of a scan (`OnnxModel.scan`) may hold of the graph's intermediate tensors:
# every tensor computed from the inputs is an output of that pass, so its batch is sized
# from the first input's outputs.
SCAN_BATCH_BYTES = 256 * 1024**2
ALLOWED_OPS = frozenset({
    # arithmetic and elementwise
    "Abs", "Add", "Ceil", "Clip", "Div", "Erf", "Exp", "Floor", "Log", "Max", "Mean", "Min",
    "Mul", "Neg", "Pow", "Reciprocal", "Round", "Sign", "Sqrt", "Sub", "Sum",
    # activations
    "Elu", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Relu", "Selu", "Sigmoid",
    "Softplus", "Softsign", "Tanh", "Softmax", "LogSoftmax",
    # linear algebra, convolution, normalisation, pooling
    "Conv", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
    "LayerNormalization", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "MaxPool",
    "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    # logic and comparison
    "And", "Equal", "Greater", "GreaterOrEqual", "IsInf", "IsNaN", "Less", "LessOrEqual", "Not",
    "Or", "Where", "Xor",
    # shapes, indexing and constants
    "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "CumSum", "Dropout", "Expand",
    "Flatten", "Gather", "GatherElements", "Identity", "Pad", "Range", "Reshape", "Shape",
    "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze",
})


_refuse = ModelFileError.refused  # the one wording (freemark.errors)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ModelFileError("ONNX models need onnx and onnxruntime: pip install "
                             "'freemark[onnx]'") from exc
    return onnx


def is_format(path: Path) -> bool:
    """Whether `path` names an ONNX model (the table's detection hook): by its suffix."""
    return path.suffix.lower() == ".onnx" and not path.is_dir()


def load_onnx(path: str | Path, *, max_bytes: int = MAX_ONNX_BYTES) -> Any:
    """Parse and vet an ONNX file (an `onnx.ModelProto`), its gather indices clamped
    (`clamp_indices`); raises ModelFileError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"{path}: no such model file") from exc
    if size > max_bytes:
        raise _refuse(path, f"{size} bytes is over the ONNX cap of {max_bytes} bytes")
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04") or raw[:1] == b"\x80":
        raise _refuse(path, "this is a zip or pickle file, not an ONNX model")
    onnx = _onnx()
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf raises DecodeError and friends on garbage
        raise ModelFileError(f"{path}: not an ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise ModelFileError(f"{path}: not an ONNX model (no graph)")
    vet_onnx(model, path)
    return clamp_indices(model, path)


def _external(tensor: Any) -> bool:
    onnx = _onnx()
    return bool(tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data))


def vet_onnx(model: Any, source: str | Path = "model") -> None:
    """Raise ModelFileError unless the graph holds only allow-listed standard operators,
    no functions, and every weight inline (module docstring)."""
    onnx = _onnx()
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise _refuse(source, f"it imports operator domain {opset.domain!r}; only the "
                          "standard ONNX domain is accepted (no custom or contrib operators)")
    if len(model.functions):
        raise _refuse(source, "it defines model-local functions; export without them")
    if len(model.training_info):
        raise _refuse(source, "it carries training info; export for inference")
    graph = model.graph
    if len(graph.sparse_initializer):
        raise _refuse(source, "it has sparse initializers")
    if len(graph.node) > MAX_NODES:
        raise _refuse(source, f"{len(graph.node)} nodes is over the cap of {MAX_NODES}")
    for tensor in graph.initializer:
        if _external(tensor):
            raise _refuse(source, f"weight {tensor.name!r} is stored outside the file (external "
                          "data); save the model with every weight inside it")
    for node in graph.node:
        if any(len(name) > MAX_TENSOR_NAME for name in node.output):
            raise _refuse(source, f"node {node.name[:80]!r} names an output with more than "
                          f"{MAX_TENSOR_NAME} characters")
        if node.domain not in STANDARD_DOMAINS:
            raise _refuse(source, f"node {node.name!r} is a {node.op_type!r} of domain "
                          f"{node.domain!r}; only standard ONNX operators are accepted")
        if node.op_type not in ALLOWED_OPS:
            raise _refuse(source, f"operator {node.op_type!r} (node {node.name!r}) is not on the "
                          "allow-list of ordinary tensor operations")
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise _refuse(source, f"node {node.name!r} has a subgraph")
            if attribute.type == onnx.AttributeProto.TENSOR and _external(attribute.t):
                raise _refuse(source, f"constant {node.name!r} is stored outside the file")
    if len(_data_inputs(model)) > MAX_INPUTS:
        raise _refuse(source, f"the graph has more than {MAX_INPUTS} inputs")
    _data_flow(model, source)


# Operand positions that index a tensor, or give a shape, size, count or axis, by operator:
# none may be computed from the graph inputs' values (`_data_flow`). Listed for every
# standard operator that has one, on the allow-list or not, so the rule holds if it grows.
INDEX_OPERANDS: dict[str, tuple[int, ...]] = {
    "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "ScatterElements": (1,),
    "ScatterND": (1,), "Scatter": (1,), "OneHot": (0, 1), "Compress": (1,),
    "Slice": (1, 2, 3, 4), "Reshape": (1,), "Expand": (1,), "Tile": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "Pad": (1, 3), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "CumSum": (1,), "Trilu": (1,), "TopK": (1,),
    "Resize": (1, 2, 3), "Upsample": (1,), "ReduceL2": (1,), "ReduceMax": (1,),
    "ReduceMean": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceSum": (1,),
    "ReduceL1": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "CenterCropPad": (1, 2), "Col2Im": (1, 2), "DFT": (1, 2), "RoiAlign": (1, 2),
    "MaxUnpool": (1, 2), "NonMaxSuppression": (2,), "ReverseSequence": (1,),
}
# The index operands that are clamped into their axis's range instead of refused
# (`clamp_indices`): a clamped gather cannot fail and costs the same for every index, and
# real graphs need them (token ids into an embedding; RoBERTa's position ids, computed
# from the token ids).
CLAMPED_OPERANDS = frozenset({("Gather", 1), ("GatherElements", 1)})
# Operators whose outputs are sizes or constants, never the values of their inputs.
SIZE_OPERATORS = frozenset({"Shape", "Size", "ConstantOfShape"})
_CLAMP_SUFFIX = "_freemark_clamp"


def _data_flow(model: Any, source: str | Path) -> tuple[list[Any], set[str]]:
    """Follow the graph inputs' values through every node (in dependency order, whatever the
    order of the file) and refuse any index or shape operand (`INDEX_OPERANDS`) computed from
    them: an out-of-range index fails with a message naming it, and a value-dependent shape
    fails or costs differently on some values only, so either would read out the secret
    triggers a suspect runs on (issue 18). Sizes (`SIZE_OPERATORS`) end the trail. Returns
    the nodes whose index operand is computed from the inputs and is clamped instead
    (`CLAMPED_OPERANDS`), and every tensor computed from the inputs' values."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output if name}
    waiting = {id(node): sum(1 for name in set(node.input) if name in producer)
               for node in graph.node}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in set(node.input):
            if name in producer:
                users.setdefault(name, []).append(node)
    ready = [node for node in graph.node if not waiting[id(node)]]
    tainted = {i.name for i in _data_inputs(model)}
    clamped, done = [], 0
    while ready:
        node = ready.pop()
        done += 1
        for position in INDEX_OPERANDS.get(node.op_type, ()):
            if position >= len(node.input) or node.input[position] not in tainted:
                continue
            if (node.op_type, position) in CLAMPED_OPERANDS:
                clamped.append(node)
                continue
            raise _refuse(source, f"node {node.name!r} ({node.op_type}) takes its operand "
                          f"{position} ({node.input[position]!r}) from the graph inputs' values: "
                          "an index or shape computed from them fails or costs differently on "
                          "some values only, which would reveal the secret triggers a suspect "
                          "is run on; compute indices and shapes from Shape and constants")
        if node.op_type not in SIZE_OPERATORS and any(n in tainted for n in node.input):
            tainted.update(name for name in node.output if name)
        for name in node.output:
            for user in users.get(name, ()):
                waiting[id(user)] -= 1
                if not waiting[id(user)]:
                    ready.append(user)
    if done != len(graph.node):
        raise _refuse(source, "its graph has a cycle")
    return clamped, tainted


def clamp_indices(model: Any, source: str | Path = "model") -> Any:
    """`model` (vetted) with every gather index computed from the inputs clamped into its
    axis's range [-size, size - 1], so that no input value can make it fail: the index is
    cast to int64 and bounded by the data's size along the axis, read with Shape. The new
    nodes are named after the gather they feed (the same module scope) and add no
    initializer, so the fingerprint and the architecture digest are unchanged; in-range
    indices read what they read before."""
    _onnx()  # a clear ModelFileError where onnx is not installed
    from onnx import TensorProto, helper

    int64 = TensorProto.INT64
    for number, node in enumerate(_data_flow(model, source)[0]):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        stem = f"{node.name or node.op_type}{_CLAMP_SUFFIX}{number}"

        def name(part: str, stem: str = stem) -> str:
            return f"{stem}_{part}"

        added = [
            helper.make_node("Constant", [], [name("axis")], name=name("axis"),
                             value=helper.make_tensor(name("axis_value"), int64, [1], [axis])),
            helper.make_node("Constant", [], [name("one")], name=name("one"),
                             value=helper.make_tensor(name("one_value"), int64, [1], [1])),
            helper.make_node("Shape", [node.input[0]], [name("shape")], name=name("shape")),
            helper.make_node("Gather", [name("shape"), name("axis")], [name("size")],
                             name=name("size"), axis=0),
            helper.make_node("Neg", [name("size")], [name("low")], name=name("low")),
            helper.make_node("Sub", [name("size"), name("one")], [name("high")],
                             name=name("high")),
            helper.make_node("Cast", [node.input[1]], [name("index")], name=name("index"),
                             to=int64),
            helper.make_node("Max", [name("index"), name("low")], [name("raised")],
                             name=name("raised")),
            helper.make_node("Min", [name("raised"), name("high")], [name("clamped")],
                             name=name("clamped")),
        ]
        node.input[1] = name("clamped")
        position = list(model.graph.node).index(node)
        for offset, new in enumerate(added):
            model.graph.node.insert(position + offset, new)
    return model


def _data_inputs(model: Any) -> list[Any]:
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _scope(node_name: str) -> str:
    """`/bert/encoder/layer.3/intermediate/dense/MatMul` -> `bert.encoder.layer.3.intermediate.dense`."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def layer_tensor(model: Any, layer: str, source: str | Path = "model") -> str:
    """The name of the tensor module `layer` outputs, from torch.onnx.export's node names."""
    inside = [n for n in model.graph.node
              if _scope(n.name) == layer or _scope(n.name).startswith(layer + ".")]
    if not inside:
        raise _refuse(source, f"no node is named after layer {layer!r} (torch.onnx.export with "
                      "dynamo=False names them /{module path}/...); name the layer's tensor "
                      "with --onnx-tensor")
    produced = {output for node in inside for output in node.output}
    inside_ids = {id(node) for node in inside}
    used_outside = {name for node in model.graph.node if id(node) not in inside_ids
                    for name in node.input}
    used_outside |= {o.name for o in model.graph.output}
    candidates = [name for node in inside for name in node.output
                  if name in produced and name in used_outside]
    if len(candidates) != 1:
        raise _refuse(source, f"cannot tell which tensor is layer {layer!r}'s output "
                      f"(candidates: {candidates[:5]}); name it with --onnx-tensor")
    return str(candidates[0])


def _check_tensor(model: Any, name: str, source: str | Path) -> None:
    produced = {output for node in model.graph.node for output in node.output}
    if name not in produced:
        raise _refuse(source, f"no node of the graph outputs a tensor named {name!r}")


@dataclass
class OnnxModel:
    """A vetted ONNX model and the tensor the key reads, ready to run."""

    proto: Any
    tensor: str
    source: str
    _built: Any = field(default=None, repr=False, compare=False)  # the session, once built
    _scan_built: Any = field(default=None, repr=False, compare=False)  # the scan's session

    @classmethod
    def open(cls, path: str | Path, layer: str, *, tensor: str | None = None,
             max_bytes: int = MAX_ONNX_BYTES) -> OnnxModel:
        """Load and vet `path`; the key tensor is `tensor`, or found from `layer`'s name."""
        model = load_onnx(path, max_bytes=max_bytes)
        name = tensor or layer_tensor(model, layer, path)
        _check_tensor(model, name, path)
        return cls(model, name, str(path))

    def fingerprint(self) -> bytes:
        """SHA-256 over the initializers (sorted names, type, dims, bytes): the weights."""
        digest = hashlib.sha256(b"freemark/v1/onnx-weights")
        for tensor in sorted(self.proto.graph.initializer, key=lambda t: t.name):
            header = json.dumps([tensor.name, int(tensor.data_type), list(tensor.dims)]).encode()
            digest.update(len(header).to_bytes(4, "big") + header + _tensor_bytes(tensor))
        return digest.digest()

    def architecture_digest(self) -> bytes:
        """SHA-256 over the sorted initializer names (the family, as for programs)."""
        names = sorted(t.name for t in self.proto.graph.initializer)
        return hashlib.sha256(b"freemark/v1/onnx-family" + json.dumps(names).encode()).digest()

    def prepared(self) -> OnnxModel:
        """This model with its onnxruntime session built (ModelFileError if the runtime cannot
        load it): what can fail before an input is fed fails here."""
        self._session()
        return self

    def _session(self) -> Any:
        if self._built is None:
            self._built = self._new_session()
        return self._built

    def _new_session(self, outputs: list[str] | None = None) -> Any:
        """A session that answers the graph's outputs and `outputs` (default: the key
        tensor)."""
        import onnxruntime as ort

        onnx = _onnx()
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        present = {o.name for o in proto.graph.output}
        for name in [self.tensor] if outputs is None else outputs:
            if name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            ort.disable_telemetry_events()
            return ort.InferenceSession(proto.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's pybind errors share no useful base
            raise ModelFileError(f"{self.source}: onnxruntime cannot load it "
                                 f"({_first_line(exc)})") from exc

    def _run(self, session: Any, names: list[str], feeds: dict[str, np.ndarray],
             shape: tuple[int, ...]) -> list[Any]:
        """`session.run` for `names`, its failures as the library's errors."""
        try:
            return list(session.run(names, feeds))
        except Exception as exc:
            if "alloc" in str(exc).lower():  # a graph that asks for more than the limit
                raise MemoryError(f"onnxruntime: {_first_line(exc)}") from exc
            raise InvalidInputError(
                f"the ONNX model cannot run on the trigger inputs of shape {shape} per "
                f"sample: {_first_line(exc)}") from exc

    def capture(self, inputs: np.ndarray, mask: np.ndarray | None, pooling: int,
                batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Pooled activations of the key tensor: (len(inputs), units) float64."""
        import torch

        from freemark.scheme.activations import pool

        session = self._session()
        feeds = _feeders(session, self.source)
        pooled = []
        for batch, batch_mask, real in _batches(inputs, mask, _static_batch(session) or batch_size,
                                                pad=bool(_static_batch(session))):
            (output,) = self._run(session, [self.tensor], feeds(batch, batch_mask),
                                  tuple(inputs.shape[1:]))
            tensor = torch.from_numpy(np.asarray(output, dtype=np.float64))
            torch_mask = None if batch_mask is None else torch.from_numpy(
                np.asarray(batch_mask, dtype=np.int64))
            pooled.append(pool(tensor, torch_mask, pooling).numpy()[:real])
        result = np.concatenate(pooled)
        if not np.all(np.isfinite(result)):
            raise InvalidInputError(f"tensor {self.tensor!r} produced non-finite activations")
        return result

    def scanned(self) -> list[str]:
        """The tensors a scan reads: every one a node computes from the graph inputs' values
        (`_data_flow`), in graph order; the key tensor is one of them whatever it is called."""
        _, computed = _data_flow(self.proto, self.source)
        return [name for node in self.proto.graph.node for name in node.output
                if name in computed]

    def scan_session(self) -> Any:
        """The session a scan runs (every `scanned` tensor an output), built once: what can
        fail before an input is fed fails here."""
        if self._scan_built is None:
            self._scan_built = self._new_session(self.scanned())
        return self._scan_built

    def scan(self, inputs: np.ndarray, mask: np.ndarray | None, *, width: int = 0
             ) -> list[tuple[str, np.ndarray]]:
        """Pooled activations of every tensor computed from the inputs that the key could be
        read on: (name, (len(inputs), units) float32) in graph order, each pooled by its
        rank, of `width` units (0: any), whatever the graph's nodes are called
        (`freemark.scheme.activations.TensorScan`, which decides by shapes alone and keeps a
        tensor that is not finite as zeros). What the key server reads an
        ONNX suspect with, so that it, not the file's author, locates the key layer. The
        model's `tensor`, where one is set (the one a requester named), is read whatever its
        width: one more candidate.

        The first pass reads one input; its outputs size the batches of the rest to
        `SCAN_BATCH_BYTES` (the vetting refuses shapes computed from input values, so the
        size is the same for every input). Raises InvalidInputError when the graph cannot
        run on the inputs or the scan exceeds the caps of `capture_every`."""
        import torch

        from freemark.scheme.activations import MAX_SCANNED_VALUES, TensorScan

        session = self.scan_session()
        feeds = _feeders(session, self.source)
        names = [o.name for o in session.get_outputs()]
        scan = TensorScan(width=width, has_mask=mask is not None,
                          always=frozenset({self.tensor} - {""}))
        static = _static_batch(session)
        done, chunk = 0, static or 1
        while done < len(inputs):
            part = slice(done, min(len(inputs), done + chunk))
            for batch, batch_mask, real in _batches(inputs[part], None if mask is None
                                                    else mask[part], chunk, pad=bool(static)):
                outputs = self._run(session, names, feeds(batch, batch_mask),
                                    tuple(inputs.shape[1:]))
                scan.start(len(batch), real, None if batch_mask is None else torch.from_numpy(
                    np.asarray(batch_mask, dtype=np.int64)))
                for name, output in zip(names, outputs, strict=True):
                    array = np.asarray(output)
                    scan.record(torch.from_numpy(array) if array.dtype.kind == "f" else None,
                                name)
                if scan.units_per_row() * len(inputs) > MAX_SCANNED_VALUES:
                    raise InvalidInputError(f"the scan exceeds {MAX_SCANNED_VALUES} values")
                if not done and not static:
                    held = sum(np.asarray(o).nbytes for o in outputs)
                    chunk = max(1, min(DEFAULT_BATCH, SCAN_BATCH_BYTES // max(1, held)))
            done = part.stop
        return scan.result(len(inputs))


def _batches(inputs: np.ndarray, mask: np.ndarray | None, chunk: int, *, pad: bool
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None, int]]:
    """(batch, its mask, how many of its rows are real) per `chunk` inputs; with `pad` (a
    graph exported with a fixed batch) the last batch is filled up by repeating its last row."""
    for start, stop in _chunks(len(inputs), chunk):
        batch = inputs[start:stop]
        batch_mask = None if mask is None else mask[start:stop]
        real = stop - start
        if pad and real < chunk:
            batch = np.concatenate([batch, np.repeat(batch[-1:], chunk - real, axis=0)])
            if batch_mask is not None:
                batch_mask = np.concatenate(
                    [batch_mask, np.repeat(batch_mask[-1:], chunk - real, axis=0)])
        yield batch, batch_mask, real


def _tensor_bytes(tensor: Any) -> bytes:
    from onnx import numpy_helper

    return np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _static_batch(session: Any) -> int | None:
    first = session.get_inputs()[0].shape
    return int(first[0]) if first and isinstance(first[0], int) and first[0] > 0 else None


_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(float)": np.float32, "tensor(double)": np.float64,
                "tensor(bool)": np.bool_}


def _feeders(session: Any, source: str) -> Any:
    """A function (batch, mask) -> feed dict, mapping the graph's inputs by name:
    `*mask*` gets the attention mask, `*token_type*` zeros, the other one the inputs."""
    specs = session.get_inputs()
    for spec in specs:
        if spec.type not in _NUMPY_TYPES:
            raise _refuse(source, f"graph input {spec.name!r} has type {spec.type}")
    data = [s for s in specs if "mask" not in s.name and "token_type" not in s.name]
    if len(data) != 1:
        raise _refuse(source, f"expected one data input beside an optional attention mask, "
                      f"got inputs {[s.name for s in specs]}")

    def feeds(batch: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for spec in specs:
            kind = _NUMPY_TYPES[spec.type]
            if "mask" in spec.name:
                value = np.ones(batch.shape[:2]) if mask is None else mask
            elif "token_type" in spec.name:
                value = np.zeros(batch.shape[:2])
            else:
                value = batch
            out[spec.name] = np.ascontiguousarray(value, dtype=kind)
        return out

    return feeds


def open_untrusted(path: str | Path, *, layer: str | None, pooling: int,
                   tensor: str | None = None, width: int = 0, **_options: Any
                   ) -> tuple[bytes, Callable[[TriggerSet], Any]]:
    """In the key server's sandbox child: open an uploaded graph for the key's layer, and
    return its identity (fingerprint ‖ architecture digest) and its run, from a set's
    triggers to the key-layer activations. `layer` None is a scan (`OnnxModel.scan`: every
    tensor of `width` units, named; `tensor`, where the
    requester named one, must exist). Opening reads no trigger, so its failures are the
    file's; the run's may depend on the triggers (the child reports them without text)."""
    if layer is None:
        model = load_onnx(path)
        if tensor:
            _check_tensor(model, tensor, path)
        graph = OnnxModel(model, tensor or "", str(path))
        graph.scan_session()
        return (graph.fingerprint() + graph.architecture_digest(),
                lambda triggers: graph.scan(triggers.inputs, triggers.attention_mask,
                                            width=width))
    named = OnnxModel.open(path, layer, tensor=tensor or None).prepared()
    return (named.fingerprint() + named.architecture_digest(),
            lambda triggers: named.capture(triggers.inputs, triggers.attention_mask, pooling))


def warm_up(folder: Path) -> None:
    """Build, read and fingerprint a tiny graph once, so a fork server imports onnx and
    onnxruntime before its children drop their privileges (`folder`: scratch space)."""
    onnx = _onnx()
    helper, tensor_proto = onnx.helper, onnx.TensorProto
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")], "warm",
                              [helper.make_tensor_value_info("x", tensor_proto.FLOAT, ["b", 2])],
                              [helper.make_tensor_value_info("y", tensor_proto.FLOAT, ["b", 2])])
    path = folder / "warm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _, run = open_untrusted(path, layer="act", pooling=bundle_pb2.POOLING_NONE)
    run(TriggerSet(inputs=np.zeros((1, 2), dtype=np.float32)))
    path.unlink()
