"""The committed protobuf/gRPC code must be exactly what `make proto` produces from proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    protos = sorted((ROOT / "proto" / "freemark" / "v1").glob("*.proto"))
    plugins = Path(sys.executable).parent
    command = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        *map(str, protos),
    ]
    if not (plugins / "protoc-gen-mypy").exists():
        command = [c for c in command if "mypy" not in c]
    subprocess.run(command, check=True, capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "freemark" / "v1").iterdir())
    committed_dir = ROOT / "client" / "freemark" / "v1"
    for relative in generated:
        fresh = (tmp_path / relative).read_text()
        committed = (committed_dir / relative.name).read_text()
        assert fresh == committed, f"{relative} drifted from proto/: run `make proto` and commit"
    expected = {p.name for p in committed_dir.iterdir() if p.name != "__init__.py" and p.is_file()}
    if (plugins / "protoc-gen-mypy").exists():
        assert expected == {r.name for r in generated}, "stale generated files: run `make proto`"
    shutil.rmtree(tmp_path / "freemark")
