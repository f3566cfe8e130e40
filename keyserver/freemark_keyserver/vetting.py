"""Vet an untrusted `torch.export` program before it runs: only ordinary tensor operations pass.

`freemark.modelfile.load_program` guarantees that loading a `.pt2` unpickles nothing, but the
graph it returns is still a program, and torch's own deserializer and verifier accept more than
tensor maths: a graph may call `aten::from_file` (read any file the server can read and mix it
into the activations we hand back), `aten::save`, `aten::_print`, any registered operator of
another namespace (`_c10d_functional` collectives talk to the network, `profiler` ops touch
global state), custom objects, or effectful higher-order operators. `vet_program` walks every
graph of the program, the subgraphs of control-flow operators included, and raises
`freemark.errors.ModelFileError` naming the first node it refuses.

The policy is an allow-list:

- node kinds: `placeholder`, `output`, `call_function`, and `get_attr` of a plain tensor or of a
  subgraph; `call_module` and `call_method` never (an exported graph has none, and they would
  dispatch to arbitrary Python);
- `call_function` targets:
  - `OpOverload`s of the `aten` and `prims` namespaces whose schema uses only tensor-program
    types (tensors, numbers, booleans, strings as arguments, devices, generators, lists and
    optionals of these), minus `DENIED_OPS`, the few of those with I/O or process-wide side
    effects. The type rule is what keeps out TorchScript's helpers that live in `aten` too
    (dict and list mutation, futures, RRefs, storages, streams, string results);
  - the control-flow higher-order operators in `ALLOWED_HIGHER_ORDER_OPS`, whose subgraphs are
    vetted like the top-level graph;
  - `ALLOWED_PYTHON_FUNCTIONS`: `operator.getitem` (picks one output of a multi-output op) and
    the pure integer arithmetic torch.export emits for dynamic (symbolic) sizes;
- signature: 1 or 2 tensor user inputs (what `capture` feeds: the trigger inputs and, for token
  models, the attention mask), 1 to `MAX_USER_OUTPUTS` outputs, no custom-object or effect-token
  inputs or outputs; parameters, buffers and constants are plain tensors (a tensor subclass runs
  Python on every op);
- at most `MAX_NODES` nodes over all graphs, so vetting itself stays cheap.

Random ops are allowed: they only make a suspect's activations noisy, which the verdict handles.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument

from freemark.errors import ModelFileError

__all__ = [
    "ALLOWED_HIGHER_ORDER_OPS",
    "ALLOWED_NAMESPACES",
    "ALLOWED_PYTHON_FUNCTIONS",
    "DENIED_OPS",
    "MAX_NODES",
    "MAX_TENSOR_INPUTS",
    "MAX_USER_OUTPUTS",
    "vet_program",
]

ALLOWED_NAMESPACES = frozenset({"aten", "prims"})

# `namespace::name` of tensor-typed ops that still do I/O or change process-wide state.
DENIED_OPS = frozenset(
    {
        "aten::from_file",  # maps any readable file into a tensor
        "aten::save",  # writes a file
        "aten::_print",  # writes to stdout
        "aten::warn",  # writes to stderr / the warnings machinery
        "aten::manual_seed",  # reseeds the process-wide generator
        "aten::seed",
        "aten::set_",  # re-points a tensor at another storage
        "aten::record_stream",
    }
)

# Control flow whose branches are subgraphs we vet; effectful wrappers (`with_effects`),
# custom-op wrappers (`auto_functionalized`) and delegates stay out.
ALLOWED_HIGHER_ORDER_OPS = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)

ALLOWED_PYTHON_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        math.trunc,
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_ite,
        torch.sym_sqrt,
        torch.sym_sum,
    }
)

# JIT schema type kinds a tensor program needs (ScalarType, Layout and MemoryFormat are ints).
_ARGUMENT_TYPE_KINDS = frozenset(
    {
        "TensorType",
        "IntType",
        "SymIntType",
        "FloatType",
        "SymFloatType",
        "BoolType",
        "SymBoolType",
        "NumberType",
        "ComplexType",
        "StringType",
        "DeviceObjType",
        "GeneratorType",
        "ListType",
        "OptionalType",
    }
)
_RETURN_TYPE_KINDS = _ARGUMENT_TYPE_KINDS - {"StringType"}

_ALLOWED_INPUT_KINDS = frozenset(
    {
        InputKind.USER_INPUT,
        InputKind.PARAMETER,
        InputKind.BUFFER,
        InputKind.CONSTANT_TENSOR,
    }
)
_ALLOWED_OUTPUT_KINDS = frozenset(
    {
        OutputKind.USER_OUTPUT,
        OutputKind.BUFFER_MUTATION,
        OutputKind.USER_INPUT_MUTATION,
    }
)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

MAX_TENSOR_INPUTS = 2
MAX_USER_OUTPUTS = 256
MAX_NODES = 100_000


def vet_program(program: torch.export.ExportedProgram) -> None:
    """Raise ModelFileError unless `program` holds only ordinary tensor operations (module doc)."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise ModelFileError(f"expected an ExportedProgram, got {type(program).__name__}")
    _vet_signature(program)
    _vet_values(program)
    seen = 0
    for graph_module in _graph_modules(program.graph_module):
        for node in graph_module.graph.nodes:
            seen += 1
            if seen > MAX_NODES:
                raise ModelFileError(f"model graph refused: more than {MAX_NODES} nodes")
            _vet_node(graph_module, node)


def _vet_signature(program: torch.export.ExportedProgram) -> None:
    signature = program.graph_signature
    for spec in signature.input_specs:
        if spec.kind not in _ALLOWED_INPUT_KINDS:
            raise ModelFileError(
                f"model graph refused: input {spec.arg} is a {spec.kind.name} input"
            )
    for out in signature.output_specs:
        if out.kind not in _ALLOWED_OUTPUT_KINDS:
            raise ModelFileError(
                f"model graph refused: output {out.arg} is a {out.kind.name} output"
            )
    user_inputs = [s.arg for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    odd = [a for a in user_inputs if not isinstance(a, (TensorArgument, ConstantArgument))]
    if odd:
        raise ModelFileError(
            f"model graph refused: user input {odd[0]} is neither a tensor nor a constant"
        )
    tensors = sum(isinstance(a, TensorArgument) for a in user_inputs)
    if not 1 <= tensors <= MAX_TENSOR_INPUTS:
        raise ModelFileError(
            f"model graph refused: {tensors} tensor inputs; expected 1 (inputs) or 2 (inputs, mask)"
        )
    outputs = sum(s.kind == OutputKind.USER_OUTPUT for s in signature.output_specs)
    if not 1 <= outputs <= MAX_USER_OUTPUTS:
        raise ModelFileError(
            f"model graph refused: {outputs} outputs; expected 1 to {MAX_USER_OUTPUTS}"
        )


def _vet_values(program: torch.export.ExportedProgram) -> None:
    """Weights and constants must be plain tensors: script objects and subclasses run code."""
    for kind, values in (("weight", program.state_dict), ("constant", program.constants)):
        for name, value in values.items():
            if type(value) not in _PLAIN_TENSOR_TYPES:
                what = type(value).__name__
                raise ModelFileError(
                    f"model graph refused: {kind} {name!r} is a {what}, not a tensor"
                )


def _graph_modules(root: torch.nn.Module) -> Iterator[torch.fx.GraphModule]:
    for name, module in root.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module
        elif type(module) is not torch.nn.Module:  # plain containers hold nested attributes
            raise ModelFileError(
                f"model graph refused: submodule {name!r} is a {type(module).__name__}"
            )


def _vet_node(owner: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    if node.op in ("placeholder", "output"):
        return
    if node.op == "get_attr":
        value = _resolve_attr(owner, node)
        if not isinstance(value, torch.fx.GraphModule) and type(value) not in _PLAIN_TENSOR_TYPES:
            raise ModelFileError(
                f"model graph refused: node {node.name!r} reads {node.target!r}, "
                f"a {type(value).__name__} (only tensors and subgraphs)"
            )
        return
    if node.op != "call_function":
        raise ModelFileError(
            f"model graph refused: node {node.name!r} is a {node.op} of {node.target!r}"
        )
    why = _refusal(node.target)
    if why:
        raise ModelFileError(
            f"model graph refused: node {node.name!r} calls {_describe(node.target)}: {why}"
        )


def _resolve_attr(owner: torch.nn.Module, node: torch.fx.Node) -> Any:
    value: Any = owner
    for part in str(node.target).split("."):
        if not hasattr(value, part):
            raise ModelFileError(
                f"model graph refused: node {node.name!r} reads missing {node.target!r}"
            )
        value = getattr(value, part)
    return value


def _refusal(target: Any) -> str | None:
    """Why `target` may not run, or None when it may."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in ALLOWED_NAMESPACES:
            return f"operators of namespace {target.namespace!r} are not allowed (only aten, prims)"
        if target.name() in DENIED_OPS:
            return "it has I/O or process-wide side effects"
        schema = target._schema
        for kinds, values in (
            (_ARGUMENT_TYPE_KINDS, schema.arguments),
            (_RETURN_TYPE_KINDS, schema.returns),
        ):
            for value in values:
                kind = _first_odd_kind(value.type, kinds)
                if kind:
                    return f"its schema uses {kind}, not a tensor-program type"
        return None
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in ALLOWED_HIGHER_ORDER_OPS:
            return None
        return "this higher-order operator is not allowed"
    if isinstance(target, torch._ops.OperatorBase):
        return "only aten/prims operator overloads are allowed"
    try:
        allowed = target in ALLOWED_PYTHON_FUNCTIONS
    except TypeError:  # unhashable callables are never on the list
        allowed = False
    return None if allowed else "only tensor operators and symbolic-size arithmetic are allowed"


def _first_odd_kind(jit_type: Any, kinds: frozenset[str]) -> str | None:
    if jit_type.kind() not in kinds:
        return str(jit_type.kind())
    for contained in jit_type.containedTypes():
        odd = _first_odd_kind(contained, kinds)
        if odd:
            return odd
    return None


def _describe(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.name()}.{target._overloadname}"
    if isinstance(target, torch._ops.OperatorBase):
        return f"higher-order operator {target.name()!r}"
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', type(target).__qualname__)}"
