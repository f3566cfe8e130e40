"""Safe model loading: real programs load; pickled payloads, compiled code and garbage are refused.

Regression asset for the `torch.export.load` fallback (docs/design.md §4): a `.pt2` whose sample
inputs were replaced by a crafted `torch.save` payload. Plain `torch.export.load` runs it;
`load_program` must refuse it without running it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hostile_models
from freemark.errors import ModelFileError
from freemark.formats import pt2
from freemark.formats.pt2 import apply_weights, fingerprint, load_program, save_program
from freemark_lab.models import DigitsCNN


@pytest.fixture(scope="module")
def program_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "host.pt2"
    save_program(DigitsCNN(), (torch.zeros(2, 1, 8, 8),), path)
    return path


def test_real_program_loads_with_module_names_and_same_fingerprint(program_file: Path) -> None:
    torch.manual_seed(0)
    module = DigitsCNN()
    program = load_program(program_file)
    names = {n for n, _ in torch.export.unflatten(program).named_modules()}
    assert {"features.0", "fc1", "act", "fc2"} <= names
    assert fingerprint(program) == fingerprint(module)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(program.module()(x), module.eval()(x), atol=1e-6)


def test_sample_inputs_payload_is_refused_and_never_runs(program_file: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    hostile = hostile_models.pickled_sample_inputs(
        program_file, tmp_path / "hostile_sample_inputs.pt2", canary)

    with pytest.raises(ModelFileError, match="unpickling"):
        load_program(hostile)
    assert not canary.exists()

    # Document the threat: plain torch.export.load runs the payload (in a child process).
    code = f"import torch; torch.export.load({str(hostile)!r})"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert canary.exists(), "torch.export.load no longer falls back to pickle: revisit modelfile"


def test_pickled_weights_are_refused(program_file: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    hostile = hostile_models.pickled_weights(program_file, tmp_path / "pickled_weights.pt2", canary)
    with pytest.raises(ModelFileError, match="pickled"):
        load_program(hostile)
    assert not canary.exists()


def test_aotinductor_entries_are_refused(program_file: Path, tmp_path: Path) -> None:
    hostile = hostile_models.with_native_code(program_file, tmp_path / "aoti.pt2")
    with pytest.raises(ModelFileError, match="AOTInductor"):
        load_program(hostile)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(100)])
def test_garbage_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt2"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="garbage.pt2"):
        load_program(path)


def test_truncated_program_is_a_clear_error(program_file: Path, tmp_path: Path) -> None:
    path = hostile_models.truncated(program_file, tmp_path / "truncated.pt2")
    with pytest.raises(ModelFileError):
        load_program(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such model file"):
        load_program(tmp_path / "absent.pt2")


def test_safetensors_weights_apply_to_the_architecture(program_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    other = DigitsCNN()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    module = apply_weights(load_program(program_file), weights)
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(module(x), other.eval()(x), atol=1e-6)
    bad = tmp_path / "bad.safetensors"
    save_file({"fc1.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ModelFileError, match="do not fit"):
        apply_weights(load_program(program_file), bad)


@pytest.fixture
def no_deserializing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to open the archive with torch or to deserialize its graph."""
    from torch._export.serde import serialize
    from torch.export.pt2_archive import _package

    calls: list[str] = []

    def record(what: str):  # type: ignore[no-untyped-def]
        def called(*_args: object, **_kwargs: object) -> None:
            calls.append(what)
            raise AssertionError(f"{what} ran on a file over the caps")

        return called

    monkeypatch.setattr(_package, "PT2ArchiveReader", record("torch's archive reader"))
    monkeypatch.setattr(serialize, "_dict_to_dataclass", record("the graph schema"))
    monkeypatch.setattr(serialize.ExportedProgramDeserializer, "deserialize", record("deserialize"))
    return calls


def test_graph_over_the_node_cap_is_counted_before_deserializing(
    program_file: Path, tmp_path: Path, no_deserializing: list[str]
) -> None:
    nodes = pt2.MAX_GRAPH_NODES + 1
    stored = hostile_models.oversized_graph(program_file, tmp_path / "many.pt2", nodes, deflate=False)
    with pytest.raises(ModelFileError, match=f"{nodes} nodes, more than {pt2.MAX_GRAPH_NODES}"):
        load_program(stored)
    assert no_deserializing == []


def test_deflated_graph_bomb_is_refused_from_the_zip_directory(
    program_file: Path, tmp_path: Path, no_deserializing: list[str]
) -> None:
    # What issue 12 measured: 150k nodes deflated to about 2 MB cost 220 CPU-s and 2.5 GB to load.
    bomb = hostile_models.oversized_graph(program_file, tmp_path / "bomb.pt2", 150_000)
    assert bomb.stat().st_size < 3 * 1024**2
    with pytest.raises(ModelFileError, match=r"models/model.json' inflates more than 100:1"):
        load_program(bomb)
    assert no_deserializing == []


def test_graph_json_over_its_cap_is_read_no_further(
    program_file: Path, tmp_path: Path, no_deserializing: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pt2, "MAX_GRAPH_JSON_BYTES", 1024)
    with pytest.raises(ModelFileError, match="its graph is larger than 1024 bytes"):
        load_program(program_file)
    assert no_deserializing == []
