"""vet_program: ordinary tensor programs pass; everything off the allow-list is refused by name.

Unsafe, side-effecting and data-dependent operators, control flow (issue 11), tensor values
smuggled into sizes, value-derived index masks, odd signatures and node kinds. The graphs are
real exports of small modules, some with one extra node inserted (vetted, never run).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hostile_models
from freemark.errors import ModelFileError
from freemark.formats import pt2_vetting
from freemark.formats.pt2 import load_program, save_program
from freemark.formats.pt2_vetting import vet_program
from freemark_lab.models import DigitsCNN

EXAMPLE = (torch.zeros(2, 1, 8, 8),)
aten = torch.ops.aten


@torch.library.custom_op("freemark_test::exfiltrate", mutates_args=())
def _exfiltrate(x: torch.Tensor) -> torch.Tensor:
    """Stands for any registered non-aten op (collectives, profiler hooks, a vendor's kernels)."""
    return x.clone()


@_exfiltrate.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CallsCustomOp(DigitsCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_exfiltrate(x))


class _CountsCalls(DigitsCNN):
    """Mutates a buffer: state that would carry one run's triggers into the next."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(x.mean(dim=(0, 1, 2, 3)))
        return super().forward(x)


class _BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).flatten(1)


class _ThreeInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a + b + c


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vetting") / "digits.pt2"
    save_program(DigitsCNN(), EXAMPLE, path)
    return path


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(DigitsCNN().eval(), EXAMPLE)


def _with_call(target: object, *args: object, **kwargs: object) -> torch.export.ExportedProgram:
    """A DigitsCNN program with one extra call_function node after the input (never run).

    "x" in `args` stands for the input node, ("call", target, args) for a nested call.
    """
    program = _program()
    graph = program.graph
    x = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "x")

    last = [x]

    def call(fn: object, call_args: tuple[object, ...], call_kwargs: dict[str, object]) -> object:
        resolved = tuple(resolve(a) for a in call_args)
        resolved_kwargs = {k: resolve(v) for k, v in call_kwargs.items()}
        with graph.inserting_after(last[0]):
            last[0] = graph.call_function(fn, resolved, resolved_kwargs)  # type: ignore[arg-type]
        return last[0]

    def resolve(value: object) -> object:
        if value == "x":
            return x
        if isinstance(value, tuple) and value and value[0] == "call":
            return call(value[1], value[2], {})
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    call(target, args, kwargs)
    return program


def test_reloaded_digits_program_passes(digits_pt2: Path) -> None:
    vet_program(load_program(digits_pt2))


def test_the_allow_list_names_real_overloads_and_nothing_refused() -> None:
    assert len(pt2_vetting.ALLOWED_OPS) > 50
    for name in pt2_vetting.ALLOWED_OPS:
        namespace, rest = name.split("::")
        packet, overload = rest.rsplit(".", 1)
        op = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
        assert pt2_vetting.operator_name(op) == name
        assert f"{namespace}::{packet}" not in pt2_vetting.REFUSED_OPS
        assert not any(a.name == "unsafe" for a in op._schema.arguments), name


def test_torch_cond_graph_is_refused_as_data_dependent_control_flow(tmp_path: Path) -> None:
    path = hostile_models.branching_on_inputs(tmp_path / "cond.pt2")
    with pytest.raises(ModelFileError, match=r"higher-order operator 'cond'.*data-dependent control"):
        vet_program(load_program(path))


@pytest.mark.parametrize(
    "name", ["while_loop", "scan", "map_impl", "associative_scan", "with_effects"]
)
def test_every_higher_order_operator_is_refused(name: str) -> None:
    with pytest.raises(ModelFileError, match=f"higher-order operator '{name}'"):
        vet_program(_with_call(getattr(torch.ops.higher_order, name)))


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "why"),
    [
        # Lengths summing past the data: writes past a heap buffer (issue 12; glibc aborts).
        (aten._segment_reduce_backward.default,
         ("x", "x", "x", "sum"), {"lengths": ("call", aten.amax.default, ("x",))},
         r"aten::_segment_reduce_backward.default: it trusts its arguments"),
        (aten.segment_reduce.default, ("x", "sum"), {"unsafe": True},
         r"aten::segment_reduce.default: .*unsafe=True skips the checks"),
        (aten._native_batch_norm_legit_no_training.default, ("x", None, None, "x", "x", 0.1, 1e-5),
         {}, r"reads past weights or statistics.*export without run_decompositions"),
        (aten.nonzero.default, ("x",), {}, "output size depends on the values"),
        (aten.masked_select.default, ("x", "x"), {}, "output size depends on the values"),
        (aten.repeat_interleave.Tensor, ("x",), {}, "output size depends on the values"),
        (aten._local_scalar_dense.default, ("x",), {}, "output size depends on the values"),
        (aten.from_file.default, ("/etc/passwd",), {}, "side effects"),
        (aten._print.default, ("hi",), {}, "side effects"),
    ],
)
def test_unsafe_side_effect_and_data_dependent_operators_are_refused_by_name(
    target: object, args: tuple[object, ...], kwargs: dict[str, object], why: str
) -> None:
    with pytest.raises(ModelFileError, match=why):
        vet_program(_with_call(target, *args, **kwargs))


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (os.getcwd, "only tensor operators"),
        (print, "only tensor operators"),
        (torch.ops.profiler._record_function_enter_new.default, "not on the sandbox's allow-list"),
        (aten.setdefault.str, "aten::setdefault.str, which is not on the sandbox's allow-list"),
        (aten.split.str, "aten::split.str, which is not on"),
        (aten.as_strided.default, "aten::as_strided.default, which is not on"),
        (aten.index_put.default, "aten::index_put.default, which is not on"),
    ],
)
def test_operators_off_the_allow_list_are_refused_by_name(target: object, why: str) -> None:
    with pytest.raises(ModelFileError, match=re.escape(why) if "::" in why else why):
        vet_program(_with_call(target))


def test_custom_op_of_another_namespace_is_refused() -> None:
    program = torch.export.export(_CallsCustomOp().eval(), EXAMPLE)
    with pytest.raises(ModelFileError, match=r"freemark_test::exfiltrate.default, which is not on"):
        vet_program(program)


def test_file_reading_graph_that_torch_loads_is_refused(digits_pt2: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(128, dtype=np.float32).tobytes())
    hostile = hostile_models.reading_file(digits_pt2, tmp_path / "leak.pt2", secret, after="relu_2")
    program = load_program(hostile)  # torch's deserializer and verifier let it through
    with pytest.raises(ModelFileError, match=r"aten::from_file.default: .*side effects"):
        vet_program(program)


def test_a_tensor_value_as_a_size_is_refused() -> None:
    # full([t], 0) reads t's value: a tensor sized by a trigger's value.
    program = _with_call(aten.full.default, [("call", aten.amax.default, ("x",))], 0.0)
    with pytest.raises(ModelFileError, match=r"as aten::full.default's 'size', which takes a size"):
        vet_program(program)


def test_python_arithmetic_on_tensors_is_refused() -> None:
    import operator

    with pytest.raises(ModelFileError, match=r"_operator.add to 'x', which is not a size"):
        vet_program(_with_call(operator.add, "x", "x"))


def test_index_by_a_mask_of_the_inputs_is_refused() -> None:
    program = _with_call(aten.index.Tensor, "x", [("call", aten.gt.Scalar, ("x", 0.5))])
    with pytest.raises(ModelFileError, match=r"indexes with 'gt_scalar', computed from the inputs' values"):
        vet_program(program)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"device": torch.device("meta")}, "device meta: the sandbox runs on CPU only"),
     ({"layout": torch.sparse_coo}, "layout torch.sparse_coo: only dense tensors")],
)
def test_other_devices_and_layouts_are_refused(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(ModelFileError, match=why):
        vet_program(_with_call(aten._to_copy.default, "x", **kwargs))


def test_buffer_mutation_is_refused_in_place_and_functional() -> None:
    program = torch.export.export(_CountsCalls().eval(), EXAMPLE)
    with pytest.raises(ModelFileError, match=r"aten::add_.Tensor, which is not on"):
        vet_program(program)
    with pytest.raises(ModelFileError, match="BUFFER_MUTATION output"):
        vet_program(program.run_decompositions())


def test_batch_norm_passes_as_exported_and_its_unchecked_decomposition_is_refused() -> None:
    program = torch.export.export(_BatchNormCNN().eval(), EXAMPLE)
    vet_program(program)
    with pytest.raises(ModelFileError, match="_native_batch_norm_legit_no_training"):
        vet_program(program.run_decompositions())


def test_call_method_is_refused() -> None:
    program = _program()
    x = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
    with program.graph.inserting_after(x):
        program.graph.call_method("tofile", (x, "/tmp/out"))
    with pytest.raises(ModelFileError, match="call_method of 'tofile'"):
        vet_program(program)


def test_more_inputs_than_capture_feeds_are_refused() -> None:
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ModelFileError, match="3 tensor inputs"):
        vet_program(torch.export.export(_ThreeInputs(), args))


# --- issue 18: no index computed from the inputs' values -------------------------------------


_LOOKUPS = {
    "as-they-are": lambda ids: ids,
    "viewed": lambda ids: ids.view(-1, ids.shape[-1]),  # GPT-2's lookup: the same elements
    "shifted": lambda ids: ids + 1,
    "viewed-shifted": lambda ids: ids.view(-1, ids.shape[-1]) + 1,
    "sliced": lambda ids: ids[:, 1:],  # a subset: would fail on chosen ids only
    "one-token-viewed": lambda ids: ids[:, 2].view(-1, 1),
}


class _Embeds(nn.Module):
    """Token ids into an embedding table, as every text model does, or ids computed from them."""

    def __init__(self, lookup: str) -> None:
        super().__init__()
        self.table, self.lookup = nn.Embedding(50, 4), _LOOKUPS[lookup]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.lookup(ids)).mean(dim=1)


def _export_embeds(lookup: str) -> torch.export.ExportedProgram:
    return torch.export.export(_Embeds(lookup).eval(), (torch.ones(2, 5, dtype=torch.int64),))


_PACKED = ("call", aten._to_copy.default, (("call", aten.mul.Tensor, ("x", 17.0)),))
_SUMMED = ("call", aten._to_copy.default, (("call", aten.sum.dim_IntList, ("x", [1, 2, 3])),))


@pytest.mark.parametrize(("target", "args", "argument"), [
    (aten.gather.default, ("x", 1, _PACKED), "index"),
    (aten.index_select.default, ("x", 0, _SUMMED), "index"),
    (aten.index.Tensor, ("x", [("call", aten.gt.Scalar, ("x", 0.5))]), "indices"),
])
def test_an_index_computed_from_the_inputs_is_refused(target: object, args: tuple[object, ...],
                                                      argument: str) -> None:
    """Issue 18's trick: trigger values packed into an index, whose out-of-range error names
    it (a `.pt2` read 87 of 87 pixels back from Verify's text). Refused by data flow,
    whatever the operator (`INDEX_ARGUMENTS`)."""
    with pytest.raises(ModelFileError, match=rf"computed from the inputs' values \(as "
                       rf"{re.escape(pt2_vetting.operator_name(target) or '')}'s '{argument}'\)"):
        vet_program(_with_call(target, *args))


def test_the_packed_gather_model_is_refused(tmp_path: Path) -> None:
    path = hostile_models.packing_gather(tmp_path / "packing.pt2")
    with pytest.raises(ModelFileError, match=r"indexes with 'unsqueeze', computed from the "
                       r"inputs' values \(as aten::gather.default's 'index'\)"):
        vet_program(load_program(path))


@pytest.mark.parametrize("lookup", ["as-they-are", "viewed"])
def test_token_ids_as_they_are_or_viewed_may_index_an_embedding(lookup: str) -> None:
    """A `view` keeps every id once: it fails on exactly the ids the input itself would."""
    vet_program(_export_embeds(lookup))


@pytest.mark.parametrize(("lookup", "node"), [
    ("shifted", "add"), ("viewed-shifted", "add"), ("sliced", "slice_1"),
    ("one-token-viewed", "view"),
])
def test_token_ids_computed_or_picked_from_the_input_may_not_index_an_embedding(
        lookup: str, node: str) -> None:
    """A function or a subset of the ids would fail on chosen ids only: one token at a time."""
    with pytest.raises(ModelFileError, match=rf"indexes with '{node}', computed from the inputs' "
                       r"values \(as aten::embedding.default's 'indices'\)"):
        vet_program(_export_embeds(lookup))


def test_an_index_built_from_the_inputs_shape_only_passes() -> None:
    # full_like(x, 0) reads x's shape, never its values
    program = _with_call(aten.gather.default, "x", 1,
                         ("call", aten.full_like.default, ("x", 0)))
    node = next(n for n in program.graph.nodes if n.target is aten.full_like.default)
    node.kwargs = {"dtype": torch.int64}
    vet_program(program)


def test_a_value_dependent_fault_with_no_index_is_admitted(tmp_path: Path) -> None:
    """What vetting leaves (its failure is found only after the whole run, answered with the
    fixed refusal): the timing test's admissible model."""
    vet_program(load_program(hostile_models.nan_on_bright(tmp_path / "nan.pt2", 0.5)))
