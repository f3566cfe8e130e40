"""The sandbox's layering (docs/keyserver.md, "How the sandbox code is layered"): the child side
never imports the parent side, and the rest of the server never imports the pool, the worker,
the fork server or the isolation layers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import freemark_keyserver

PACKAGE = Path(freemark_keyserver.__path__[0])
SANDBOX = "freemark_keyserver.sandbox"
PARENT = {f"{SANDBOX}.runner", f"{SANDBOX}.pool"}
CHILD = {f"{SANDBOX}.forkserver", f"{SANDBOX}.worker", f"{SANDBOX}.isolation"}
SHARED = {f"{SANDBOX}.limits", f"{SANDBOX}.protocol", f"{SANDBOX}.errors", f"{SANDBOX}.formats"}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (`from a import b` gives a.b too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module(path: Path) -> str:
    return ".".join(("freemark_keyserver", *path.relative_to(PACKAGE).with_suffix("").parts))


def test_the_child_side_imports_no_parent_module() -> None:
    for name in CHILD | SHARED:
        path = PACKAGE / "sandbox" / f"{name.rsplit('.', 1)[1]}.py"
        assert not _imports(path) & PARENT, name


def test_the_fork_server_loads_no_parent_code() -> None:
    """What `python -m freemark_keyserver.sandbox.forkserver` imports of ours, warm-up included."""
    code = ("import json, sys, freemark_keyserver.sandbox.forkserver, "
            "freemark_keyserver.sandbox.formats; print(json.dumps(sorted("
            "m for m in sys.modules if m.startswith('freemark_keyserver'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, env=env,
                                           capture_output=True, text=True).stdout))
    assert loaded <= {"freemark_keyserver", SANDBOX} | CHILD | SHARED, loaded - CHILD - SHARED


def test_the_server_reaches_the_sandbox_through_its_face() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "sandbox":
            continue
        assert not _imports(path) & (CHILD | {f"{SANDBOX}.pool"}), _module(path)
