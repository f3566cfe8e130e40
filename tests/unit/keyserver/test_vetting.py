"""vet_program: ordinary tensor programs pass; I/O, foreign ops and odd signatures are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hostile_models
from freemark.errors import ModelFileError
from freemark.modelfile import load_program, save_program
from freemark_keyserver.vetting import vet_program
from freemark_lab.models import DigitsCNN

EXAMPLE = (torch.zeros(2, 1, 8, 8),)


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


class _BranchesOnInput(DigitsCNN):
    """Control flow: `cond` carries its branches as subgraphs, which must be vetted too."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def left(t: torch.Tensor) -> torch.Tensor:
            return _exfiltrate(t) if self.branch == "custom" else t * 2

        return super().forward(torch.cond(x.sum() > 0, left, lambda t: t.clone(), (x,)))


class _ThreeInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a + b + c


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vetting") / "digits.pt2"
    save_program(DigitsCNN(), EXAMPLE, path)
    return path


def _with_call(target: object) -> torch.export.ExportedProgram:
    """A DigitsCNN program with one extra call_function node (never run, only vetted)."""
    program = torch.export.export(DigitsCNN().eval(), EXAMPLE)
    first = next(n for n in program.graph.nodes if n.op == "call_function")
    with program.graph.inserting_before(first):
        program.graph.call_function(target, ())  # type: ignore[arg-type]
    return program


def test_reloaded_digits_program_passes(digits_pt2: Path) -> None:
    vet_program(load_program(digits_pt2))


def test_custom_op_of_another_namespace_is_refused() -> None:
    program = torch.export.export(_CallsCustomOp().eval(), EXAMPLE)
    with pytest.raises(
        ModelFileError, match=r"freemark_test::exfiltrate.*namespace 'freemark_test'"
    ):
        vet_program(program)


def test_cond_with_aten_branches_passes() -> None:
    vet_program(torch.export.export(_BranchesOnInput("aten").eval(), EXAMPLE))


def test_custom_op_inside_a_cond_branch_is_refused() -> None:
    program = torch.export.export(_BranchesOnInput("custom").eval(), EXAMPLE)
    with pytest.raises(ModelFileError, match="freemark_test::exfiltrate"):
        vet_program(program)


def test_file_reading_graph_that_torch_loads_is_refused(digits_pt2: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(128, dtype=np.float32).tobytes())
    hostile = hostile_models.reading_file(digits_pt2, tmp_path / "leak.pt2", secret, after="relu_2")
    program = load_program(hostile)  # torch's deserializer and verifier let it through
    with pytest.raises(ModelFileError, match=r"aten::from_file.*side effects"):
        vet_program(program)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (os.getcwd, "only tensor operators"),
        (print, "only tensor operators"),
        (torch.ops.profiler._record_function_enter_new.default, "namespace 'profiler'"),
        (torch.ops.aten._print.default, "side effects"),
        (torch.ops.aten.save.default, "side effects"),
        (torch.ops.aten.setdefault.str, "DictType"),  # TorchScript helpers live in aten too
        (torch.ops.aten.split.str, "StringType"),
        (torch.ops.higher_order.with_effects, "higher-order operator"),
    ],
)
def test_calls_outside_the_allow_list_are_refused(target: object, why: str) -> None:
    with pytest.raises(ModelFileError, match=why):
        vet_program(_with_call(target))


def test_call_method_is_refused() -> None:
    program = torch.export.export(DigitsCNN().eval(), EXAMPLE)
    x = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
    with program.graph.inserting_after(x):
        program.graph.call_method("tofile", (x, "/tmp/out"))
    with pytest.raises(ModelFileError, match="call_method of 'tofile'"):
        vet_program(program)


def test_more_inputs_than_capture_feeds_are_refused() -> None:
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ModelFileError, match="3 tensor inputs"):
        vet_program(torch.export.export(_ThreeInputs(), args))
