"""The floor plan holds (DESIGN.md §2): the import contracts in pyproject.toml, and what they
cannot see, what a fresh interpreter actually loads.

import-linter reads the source, so it sees every import, lazy ones included, but not that
importing `freemark.verdict.decision` first runs `freemark/__init__.py`: the checks in a fresh
interpreter below cover that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [ROOT / "client", ROOT / "keyserver", ROOT / "lab"]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "contracts"]
HEAVY = ["torch", "grpc"]


def _environment() -> dict[str, str]:
    """This clone's three source roots and nothing else on the path (not an editable install
    of another clone)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, SOURCE_ROOTS))}


def _loads(statements: str, watched: list[str], then: str = "") -> dict[str, Any]:
    """Run `statements` in a new interpreter of this venv and say which of `watched` it left
    in sys.modules (`loaded`), and where `freemark` and `freemark_keyserver` came from;
    `then` runs after that count and may add entries to the dict `seen`."""
    code = textwrap.dedent(f"""
        import json, sys
        {statements}
        seen = {{"loaded": [m for m in {watched!r} if m in sys.modules]}}
        seen["files"] = [m.__file__ for name, m in sorted(sys.modules.items())
                         if name in ("freemark", "freemark_keyserver")]
        {then}
        print(json.dumps(seen))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_environment(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    for file in seen["files"]:  # this clone's code, not another clone's editable install
        assert any(Path(file).is_relative_to(root) for root in SOURCE_ROOTS), file
    return seen


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One import graph for every contract of the run, outside the clone."""
    return tmp_path_factory.mktemp("import-linter")


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_import_contract_is_kept(contract: str, cache_dir: Path) -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} missing: pip install -e '.[dev]'"
    done = subprocess.run([str(lint_imports), "--no-logo", "--cache-dir", str(cache_dir),
                           "--contract", contract], env=_environment(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"contract {contract} broken:\n{done.stdout}{done.stderr}"


def test_the_verdict_loads_without_torch_or_grpc() -> None:
    seen = _loads("import freemark.verdict.decision, freemark.verdict.stats, "
                  "freemark.verdict.aligned", HEAVY)
    assert seen["loaded"] == [], f"importing the verdict loads {seen['loaded']}"


def test_the_endpoint_client_loads_without_torch_or_grpc() -> None:
    seen = _loads("import freemark.endpoint", HEAVY)
    assert seen["loaded"] == [], f"importing the endpoint client loads {seen['loaded']}"


def test_the_fork_server_loads_no_parent_code() -> None:
    seen = _loads("import freemark_keyserver.sandbox.forkserver",
                  ["freemark_keyserver.sandbox.pool", "freemark_keyserver.sandbox.runner"])
    assert seen["loaded"] == [], f"the fork server loads {seen['loaded']}"


def test_the_face_is_lazy() -> None:
    resolve = ("from freemark.derive import derive_key; "
               "from freemark.rpc import KeyServiceClient; "
               "seen['resolves'] = [freemark.derive_key is derive_key, "
               "freemark.KeyServiceClient is KeyServiceClient]")
    seen = _loads("import freemark", HEAVY, then=resolve)
    assert seen["loaded"] == [], f"`import freemark` loads {seen['loaded']}"
    assert seen["resolves"] == [True, True], "freemark.derive_key, freemark.KeyServiceClient"
