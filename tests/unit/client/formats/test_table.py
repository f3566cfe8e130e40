"""The formats table is the one place a format is spelled: every wire value has one row, every
row's module answers for its own files, and the table itself stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from freemark.errors import InvalidInputError
from freemark.formats import table
from freemark.v1 import keyservice_pb2 as pb


def test_every_wire_format_has_exactly_one_row() -> None:
    wire = {v.number for v in pb.ModelFormat.DESCRIPTOR.values if v.number != 0}
    assert sorted(row.wire for row in table.FORMATS) == sorted(wire)
    assert len({row.name for row in table.FORMATS}) == len(table.FORMATS)


@pytest.mark.parametrize("row", table.FORMATS, ids=lambda r: r.name)
def test_each_row_names_a_module_with_the_detection_hook(row: table.ModelFormat) -> None:
    assert callable(row.opener().is_format)
    assert table.by_name(row.name) is row and table.by_wire(row.wire) is row


def test_paths_are_told_apart_by_their_format_modules(tmp_path: Path) -> None:
    (tmp_path / "m.pt2").write_bytes(b"PK")
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)  # not packed: bare weights
    (tmp_path / "m.bin").write_bytes(b"GGUF\3\0\0\0")  # a GGUF by its magic, not its name
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    names = ("m.pt2", "m.onnx", "w.safetensors", "ckpt", "m.bin")
    assert [table.format_of(tmp_path / n) for n in names] \
        == ["pt2", "onnx", "safetensors", "hf", "gguf"]
    with pytest.raises(InvalidInputError, match="cannot tell the model format"):
        table.format_of(tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="needs a config.json"):
        table.format_of(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="unknown model format 'ggml'"):
        table.by_name("ggml")


def test_hosts_and_suspects_come_from_the_rows() -> None:
    assert [r.name for r in table.HOSTS] == ["hf", "pt2"]
    assert {r.name for r in table.SUSPECTS} == {"hf", "lora", "pt2", "safetensors", "onnx", "gguf"}
    assert table.names(table.HOSTS) == (
        "a Hugging Face checkpoint (a directory with config.json, or one packed .safetensors) "
        "or a torch.export program (.pt2)")


def test_the_table_imports_no_torch() -> None:
    code = "import sys, freemark.formats.table; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
