"""Vet an untrusted `torch.export` program before it runs: only the operators real models use pass.

`freemark.formats.pt2.load_program` guarantees that loading a `.pt2` unpickles nothing and that
its archive and graph are within the size and node caps before anything is inflated or
deserialized, but the graph it returns is still a program. torch's deserializer and verifier
accept about 2,180 aten/prims overloads with tensor types, and some of them trust their
arguments: `aten._segment_reduce_backward` with lengths that sum past its input writes past a
heap buffer, `aten.segment_reduce(..., unsafe=True)` and `aten._native_batch_norm_legit_no_training`
with statistics shorter than the input's channels read past one (measured with torch 2.13);
others read files (`aten::from_file`), print, reseed the process, or let a program's cost
depend on the values it reads. `vet_program` walks the graph and raises
`freemark.errors.ModelFileError` naming the first node it refuses and why.

The policy is an allow-list derived from models, not a deny-list:

- `call_function` of an operator overload named in `allowed_ops.txt` beside this module
  (`ALLOWED_OPS`), the overloads that the project's models, ccexam's MNISTNet,
  EfficientNet-Lite0, BERT-family and ViT transformers, GPT-2, Llama, Qwen2 and Mistral
  decoders and a module of the common layers need when exported the way
  `freemark.formats.pt2.save_program` does, with and without the core-ATen decomposition.
  `scripts/derive_vetting_allowlist.py` regenerates it; a model that needs another operator is
  refused with a message naming it, and the list grows only by a reviewed change to that
  script (docs/keyserver.md, "Extending the operator allow-list");
- `REFUSED_OPS`: operators refused with a specific reason even if a model needed one (the
  script fails rather than list them): memory-unsafe on hostile arguments, side effects, and
  data-dependent output sizes (`nonzero`, `unique`, `masked_select`, `repeat_interleave` with
  tensor repeats, `item`), whose cost depends on the values they read;
- no higher-order operators: `cond`, `while_loop`, `scan`, `map`, `associative_scan` and the
  rest are data-dependent control flow or wrappers, and a program whose cost depends on its
  inputs' values leaks other owners' secret triggers through time or a resource failure
  during Register's prior-claim runs (issue 11);
- no tensor values where a size or a scalar is expected (an `int[]` argument accepts a 0-dim
  tensor and reads its value, so `zeros([t])` would size a tensor by a trigger's value), and
  no index computed from the inputs' values (`INDEX_ARGUMENTS`: the index of `gather`,
  `index_select`, `index`, `scatter`, `take`, an embedding's indices, a loss's target, a
  narrow's start...), found by following every tensor from the user
  inputs through every node (`_Graph`; sizes, and the `SHAPE_ONLY_OPS` that read only a
  shape, end the trail). An out-of-range index raises with a message naming it, and a
  boolean mask gives a value-dependent size: a suspect that packed trigger values into an
  index read them back from Verify's error (issue 18). The real models index with `arange`
  of the input's sizes; the one exception is a user input itself, unchanged or only
  reshaped by `view` (`VALUE_PRESERVING_VIEWS`: the same elements, as GPT-2 passes them), as
  an embedding's indices (`RAW_INPUT_INDICES`: token ids), which can tell only whether every
  trigger id is below the table's size;
- the pure integer arithmetic torch.export emits for dynamic (symbolic) sizes
  (`ALLOWED_PYTHON_FUNCTIONS`) on sizes only, and `operator.getitem` picking one output of a
  multi-output operator;
- devices: CPU only; layouts: dense (strided) only;
- node kinds: `placeholder`, `output`, `call_function`, `get_attr` of a plain tensor (or of a
  subgraph, which only a refused higher-order operator could call);
- signature: 1 or 2 tensor user inputs (what `capture` feeds: the trigger inputs and, for token
  models, the attention mask), 1 to `MAX_USER_OUTPUTS` outputs, no custom-object, effect-token
  or mutation outputs (a mutated buffer would carry one run's trigger values into the next
  run of the same child); parameters, buffers and constants are plain tensors (a tensor
  subclass runs Python on every op);
- at most `MAX_NODES` operator calls (the cap `load_program` already enforced on the file).

Operators on the list that index, gather or take sizes were tried with hostile arguments on CPU
(out-of-range, negative and huge indices, mismatched shapes): `index`, `gather`,
`index_select`, `embedding`, `select`, `slice`, `view`, `expand`, `split_with_sizes`, `cat`,
`constant_pad_nd`, `scaled_dot_product_attention`, `batch_norm`, `layer_norm`, `group_norm`,
`convolution` and `addmm` raise instead of reading out of bounds; the native batch-norm forms
do not, which is why they are refused (`aten::batch_norm`, what `save_program` exports, checks).
What vetting cannot remove: a run's cost still grows with the number of triggers, float
arithmetic on subnormal values is slower on most CPUs (the sandbox should flush denormals),
non-finite values can arise from some values only (they are found after the whole run), and
token ids out of an embedding table's range raise: the sandbox child reports any failure of
a run on triggers as one fixed status without text, and runs on other owners' triggers
answer like a non-claim (docs/keyserver.md, "What the sandbox admits"). RoBERTa's position
ids, computed from the token ids, are refused by the index rule.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument

from freemark.errors import ModelFileError
from freemark.formats.pt2 import MAX_GRAPH_NODES

__all__ = [
    "ALLOWED_OPS",
    "ALLOWED_PYTHON_FUNCTIONS",
    "DATA_DEPENDENT_CONTROL_FLOW",
    "INDEX_ARGUMENTS",
    "MAX_NODES",
    "MAX_TENSOR_INPUTS",
    "MAX_USER_OUTPUTS",
    "RAW_INPUT_INDICES",
    "REFUSED_OPS",
    "SHAPE_ONLY_OPS",
    "operator_name",
    "vet_program",
]

_ALLOWLIST_FILE = "allowed_ops.txt"


@cache
def _allowed_ops() -> frozenset[str]:
    text = resources.files(__package__).joinpath(_ALLOWLIST_FILE).read_text()
    return frozenset(
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()
    )


ALLOWED_OPS = _allowed_ops()

_MEMORY_UNSAFE = "it trusts its arguments: on hostile ones it reads or writes past a buffer"
_NATIVE_BATCH_NORM = (
    "it reads past weights or statistics shorter than the input's channels; export without "
    "run_decompositions() (aten::batch_norm checks them)"
)
_SIDE_EFFECTS = "it has I/O or process-wide side effects"
_DATA_DEPENDENT_SIZE = (
    "its output size depends on the values it reads, so the run's cost would reveal them"
)

# `namespace::name` (every overload) -> why it is refused even if a model needed it.
REFUSED_OPS: dict[str, str] = {
    "aten::_segment_reduce_backward": _MEMORY_UNSAFE,
    "aten::segment_reduce": f"{_MEMORY_UNSAFE} (unsafe=True skips the checks of its lengths)",
    "aten::_native_batch_norm_legit_no_training": _NATIVE_BATCH_NORM,
    "aten::_native_batch_norm_legit": _NATIVE_BATCH_NORM,
    "aten::_native_batch_norm_legit_functional": _NATIVE_BATCH_NORM,
    "aten::native_batch_norm": _NATIVE_BATCH_NORM,
    "aten::from_file": f"{_SIDE_EFFECTS} (maps any readable file into a tensor)",
    "aten::save": _SIDE_EFFECTS,
    "aten::_print": _SIDE_EFFECTS,
    "aten::warn": _SIDE_EFFECTS,
    "aten::manual_seed": _SIDE_EFFECTS,
    "aten::seed": _SIDE_EFFECTS,
    "aten::set_": f"{_SIDE_EFFECTS} (re-points a tensor at another storage)",
    "aten::record_stream": _SIDE_EFFECTS,
    "aten::nonzero": _DATA_DEPENDENT_SIZE,
    "aten::nonzero_numpy": _DATA_DEPENDENT_SIZE,
    "aten::argwhere": _DATA_DEPENDENT_SIZE,
    "aten::unique": _DATA_DEPENDENT_SIZE,
    "aten::_unique": _DATA_DEPENDENT_SIZE,
    "aten::_unique2": _DATA_DEPENDENT_SIZE,
    "aten::unique_dim": _DATA_DEPENDENT_SIZE,
    "aten::unique_consecutive": _DATA_DEPENDENT_SIZE,
    "aten::unique_dim_consecutive": _DATA_DEPENDENT_SIZE,
    "aten::masked_select": _DATA_DEPENDENT_SIZE,
    "aten::repeat_interleave": _DATA_DEPENDENT_SIZE,
    "aten::item": _DATA_DEPENDENT_SIZE,
    "aten::_local_scalar_dense": _DATA_DEPENDENT_SIZE,
    "aten::bincount": _DATA_DEPENDENT_SIZE,
    "aten::histc": _DATA_DEPENDENT_SIZE,
}

# Higher-order operators whose work depends on their inputs' values (issue 11); every other
# higher-order operator is refused too, with a generic reason.
DATA_DEPENDENT_CONTROL_FLOW = frozenset(
    {"cond", "while_loop", "while_loop_stack_output", "scan", "map_impl", "map",
     "associative_scan", "flex_attention"}
)

# Tensor arguments that index or bound another tensor: none may be computed from the user
# inputs' values (`_Graph._vet_operator`), whatever the operator, so an operator added to the
# allow-list later is held to the same rule. An index out of range raises with a message
# naming it, and a value-dependent index can fail, or size the output, on some trigger values
# only: the failure, its text or its time would read out the triggers (issue 18).
INDEX_ARGUMENTS = frozenset({"index", "indices", "target", "offsets", "start", "end",
                             "per_sample_weights", "lengths", "repeats", "boundaries"})
# (operator, argument) where a user input itself, unchanged, may be the index: token ids
# into an embedding table, which every text model needs. The most that leaks through it is
# whether every trigger id is below the table's size, one bit per call (docs/keyserver.md).
RAW_INPUT_INDICES = frozenset({(torch.ops.aten.embedding.default, "indices")})
# Operators that only lay a tensor's elements out in another shape, every element kept exactly
# once (`view` checks that the element count is unchanged): a user input seen through them holds
# the same values as the input itself, so as an embedding's indices it fails on exactly the
# same trigger ids and tells nothing more. GPT-2 looks its token ids up as
# `input_ids.view(-1, length)`. A slice, select, gather or arithmetic is not on this list: a
# subset or a function of the ids would fail on chosen ids only, one token's bits at a time.
VALUE_PRESERVING_VIEWS = frozenset({torch.ops.aten.view.default})
# Operators whose output values are constants whatever their input's values (only its shape
# is read): their output is not computed from the inputs' values.
SHAPE_ONLY_OPS = frozenset({"aten::zeros_like", "aten::ones_like", "aten::empty_like",
                            "aten::full_like", "aten::new_zeros", "aten::new_ones",
                            "aten::new_empty", "aten::new_full"})

# Shape queries: their results are sizes of the inputs, never their values.
_SIZE_OPS = frozenset({"aten::sym_size.int", "aten::sym_numel.default", "aten::sym_stride.int",
                       "aten::sym_storage_offset.default"})

ALLOWED_PYTHON_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
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

_ALLOWED_INPUT_KINDS = frozenset(
    {InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

MAX_TENSOR_INPUTS = 2
MAX_USER_OUTPUTS = 256
MAX_NODES = MAX_GRAPH_NODES


def operator_name(target: Any) -> str | None:
    """`namespace::name.overload` of an operator overload, `higher_order::name` of a
    higher-order operator, None for anything else (the names `allowed_ops.txt` holds)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}"
    return None


def vet_program(program: torch.export.ExportedProgram) -> None:
    """Raise ModelFileError unless `program` holds only what real models use (module doc)."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise ModelFileError(f"expected an ExportedProgram, got {type(program).__name__}")
    _vet_signature(program)
    _vet_values(program)
    graphs = list(_graph_modules(program.graph_module))
    nodes = sum(n.op not in ("placeholder", "output") for g in graphs for n in g.graph.nodes)
    if nodes > MAX_NODES:
        raise ModelFileError(f"model graph refused: {nodes} nodes, more than {MAX_NODES}")
    user_inputs = {
        spec.arg.name for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument)
    }
    for graph_module in graphs:
        _Graph(graph_module, user_inputs).vet()


def _vet_signature(program: torch.export.ExportedProgram) -> None:
    signature = program.graph_signature
    for spec in signature.input_specs:
        if spec.kind not in _ALLOWED_INPUT_KINDS:
            raise ModelFileError(
                f"model graph refused: input {spec.arg} is a {spec.kind.name} input"
            )
    for out in signature.output_specs:
        if out.kind != OutputKind.USER_OUTPUT:
            raise ModelFileError(
                f"model graph refused: output {out.arg} is a {out.kind.name} output "
                "(only user outputs: a run may not change its buffers or inputs)"
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
    outputs = len(signature.output_specs)
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


class _Graph:
    """One graph's walk: nodes in order, remembering which carry values of the user inputs."""

    def __init__(self, owner: torch.fx.GraphModule, user_inputs: set[str]) -> None:
        self.owner = owner
        self.user_inputs = user_inputs
        self.tainted: set[torch.fx.Node] = set()  # values depend on the user inputs' values
        self.sizes: set[torch.fx.Node] = set()  # symbolic sizes (never tensors)

    def vet(self) -> None:
        seen: set[torch.fx.Node] = set()
        for node in self.owner.graph.nodes:
            inputs = node.all_input_nodes
            if not seen.issuperset(inputs):  # the walk below needs every input seen first
                raise self._refuse(node, "uses a value defined after it")
            seen.add(node)
            self._vet_node(node)
            if node.op == "placeholder" and node.name in self.user_inputs:
                self.tainted.add(node)
            elif operator_name(node.target) in _SIZE_OPS or node.target in ALLOWED_PYTHON_FUNCTIONS:
                self.sizes.add(node)
            elif _schema_name(node.target) in SHAPE_ONLY_OPS:
                continue  # its values are constants; only its shape comes from its input
            elif any(n in self.tainted for n in inputs):
                self.tainted.add(node)

    def _refuse(self, node: torch.fx.Node, why: str) -> ModelFileError:
        return ModelFileError(f"model graph refused: node {node.name!r} {why}")

    def _vet_node(self, node: torch.fx.Node) -> None:
        if node.op in ("placeholder", "output"):
            return
        if node.op == "get_attr":
            value = _resolve_attr(self.owner, node)
            # A subgraph is inert but for the higher-order operator that calls it (refused).
            if type(value) not in _PLAIN_TENSOR_TYPES and not isinstance(value, torch.fx.GraphModule):
                raise self._refuse(
                    node, f"reads {node.target!r}, a {type(value).__name__} (only tensors)"
                )
            return
        if node.op != "call_function":
            raise self._refuse(node, f"is a {node.op} of {node.target!r}")
        self._vet_devices(node)
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            self._vet_operator(node, target)
        elif isinstance(target, torch._ops.HigherOrderOperator):
            why = (
                "is data-dependent control flow: its cost can depend on the values of other "
                "owners' secret triggers" if target.name() in DATA_DEPENDENT_CONTROL_FLOW
                else "is not allowed (no higher-order operators)"
            )
            raise self._refuse(node, f"calls higher-order operator {target.name()!r}, which {why}")
        elif isinstance(target, torch._ops.OperatorBase):
            raise self._refuse(node, f"calls {target!r}: only aten operator overloads are allowed")
        elif target is operator.getitem:
            self._vet_getitem(node)
        elif _is_allowed_python(target):
            odd = [n for n in node.all_input_nodes if n not in self.sizes]
            if odd:
                raise self._refuse(
                    node, f"applies {_describe(target)} to {odd[0].name!r}, which is not a size"
                )
        else:
            raise self._refuse(
                node, f"calls {_describe(target)}: only tensor operators and symbolic-size "
                "arithmetic are allowed"
            )

    def _vet_operator(self, node: torch.fx.Node, target: torch._ops.OpOverload) -> None:
        name = operator_name(target)
        why = REFUSED_OPS.get(target._schema.name)
        if why:
            raise self._refuse(node, f"calls {name}: {why}")
        if name not in ALLOWED_OPS:
            raise self._refuse(
                node, f"calls {name}, which is not on the sandbox's allow-list of operators "
                "real models use (see 'Extending the operator allow-list' in docs/keyserver.md)"
            )
        for argument, value in _bound_arguments(node, target):
            if _holds_tensors(argument.type):
                continue
            for arg in _nodes_in(value):
                if arg not in self.sizes:
                    raise self._refuse(
                        node, f"passes {arg.name!r} as {name}'s {argument.name!r}, which "
                        "takes a size or a scalar: only sizes may go there, not tensor values"
                    )
        for argument, value in _bound_arguments(node, target):
            if argument.name not in INDEX_ARGUMENTS or not _holds_tensors(argument.type):
                continue
            for index in _nodes_in(value):
                if index not in self.tainted or self._raw_index(node, argument.name, index):
                    continue
                raise self._refuse(
                    node, f"indexes with {index.name!r}, computed from the inputs' values (as "
                    f"{name}'s {argument.name!r}): an index taken from them fails or sizes the "
                    "output on some values only, which would reveal other owners' secret "
                    "triggers; index with tensors computed from sizes and constants"
                )

    def _raw_index(self, node: torch.fx.Node, argument: str, index: torch.fx.Node) -> bool:
        """An embedding's indices that are a user input as it is, or seen through
        `VALUE_PRESERVING_VIEWS` only: token ids (module doc)."""
        source = index
        while (isinstance(source.target, torch._ops.OpOverload)
               and source.target in VALUE_PRESERVING_VIEWS):
            viewed = source.args[0]
            if not isinstance(viewed, torch.fx.Node):
                return False
            source = viewed
        return (source.op == "placeholder" and source.name in self.user_inputs
                and (node.target, argument) in RAW_INPUT_INDICES)

    def _vet_getitem(self, node: torch.fx.Node) -> None:
        source, index = node.args[0], node.args[1]
        produces_many = (
            isinstance(source, torch.fx.Node)
            and isinstance(source.target, torch._ops.OpOverload)
            and (len(source.target._schema.returns) > 1
                 or str(source.target._schema.returns[0].type) == "List[Tensor]")
        )
        if not produces_many or type(index) is not int:
            raise self._refuse(
                node, "uses operator.getitem other than to pick one output of a multi-output "
                "operator by a constant position"
            )

    def _vet_devices(self, node: torch.fx.Node) -> None:
        for value in (*node.args, *node.kwargs.values()):
            if isinstance(value, torch.device) and value.type != "cpu":
                raise self._refuse(node, f"asks for device {value}: the sandbox runs on CPU only")
            if isinstance(value, torch.layout) and value != torch.strided:
                raise self._refuse(node, f"asks for layout {value}: only dense tensors")


def _bound_arguments(
    node: torch.fx.Node, target: torch._ops.OpOverload
) -> Iterator[tuple[Any, Any]]:
    """(schema argument, value in the node) for every argument the node passes."""
    for position, argument in enumerate(target._schema.arguments):
        if position < len(node.args) and not argument.kwarg_only:
            yield argument, node.args[position]
        elif argument.name in node.kwargs:
            yield argument, node.kwargs[argument.name]


def _holds_tensors(jit_type: Any) -> bool:
    """Tensor, Tensor?, Tensor[] or Tensor?[]: the positions a node may be passed to as a tensor."""
    if jit_type.kind() == "TensorType":
        return True
    contained = jit_type.containedTypes()
    return len(contained) == 1 and _holds_tensors(contained[0])


def _nodes_in(value: Any) -> Iterator[torch.fx.Node]:
    if isinstance(value, torch.fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nodes_in(item)


def _schema_name(target: Any) -> str | None:
    return target._schema.name if isinstance(target, torch._ops.OpOverload) else None


def _is_allowed_python(target: Any) -> bool:
    try:
        return target in ALLOWED_PYTHON_FUNCTIONS
    except TypeError:  # unhashable callables are never on the list
        return False


def _resolve_attr(owner: torch.nn.Module, node: torch.fx.Node) -> Any:
    value: Any = owner
    for part in str(node.target).split("."):
        if not hasattr(value, part):
            raise ModelFileError(
                f"model graph refused: node {node.name!r} reads missing {node.target!r}"
            )
        value = getattr(value, part)
    return value


def _describe(target: Any) -> str:
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', type(target).__qualname__)}"
