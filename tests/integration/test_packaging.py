"""The core distribution alone, as an owner or an auditor gets it from `pip install freemark`.

A fresh virtualenv gets torch==2.13.0 first (the CPU wheel on local disk, so nothing pulls a
CUDA build), then the repository's root project with no extras and all its dependencies. In
it: the library and the `freemark` command work, a signed receipt made out here verifies
offline and a tampered one is refused, and neither the key server, the lab nor their
dependencies (psycopg, scikit-learn, ...) are there. Slow (the install: about a minute with
pip's cache warm), but part of `make test`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from freemark.audit.receipt import save_statement
from signed_statements import standard_log

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 120
# What only the extras may bring: the server, the lab, and their dependencies.
NOT_IN_CORE = ("freemark_keyserver", "freemark_lab", "psycopg", "sklearn", "matplotlib",
               "mlxtend", "transformers", "onnx", "onnxruntime", "grpc_health",
               "grpc_reflection")


def _env() -> dict[str, str]:
    """This process's environment without PYTHONPATH, which would show the source trees."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(argv: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _checked(argv: list[str], cwd: Path, timeout: float) -> None:
    result = _run(argv, cwd, timeout)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv holding torch==2.13.0 and the core distribution."""
    base = tmp_path_factory.mktemp("packaging")
    # Build from a copy: pip's in-tree build would write build/ and *.egg-info into the repo,
    # and the copy holds the core's files only, so nothing else can leak into the wheel.
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "client", source / "client",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _checked([sys.executable, "-m", "venv", str(base / "venv")], base, RUN_TIMEOUT_S)
    # --no-compile: byte-compiling torch's thousands of modules is most of the install's
    # CPU time, and the test imports a few of them.
    pip = [str(base / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check", "--no-compile"]
    _checked([*pip, "torch==2.13.0"], base, INSTALL_TIMEOUT_S)
    _checked([*pip, str(source)], base, INSTALL_TIMEOUT_S)
    return base / "venv" / "bin"


def test_the_core_imports_without_the_server_the_lab_or_their_dependencies(core: Path) -> None:
    code = (
        "import importlib.util, freemark, freemark.cli.app, freemark.audit.receipt, freemark.rpc, scipy\n"
        f"present = [m for m in {NOT_IN_CORE!r} if importlib.util.find_spec(m) is not None]\n"
        "assert not present, present\n"
        "print(freemark.__file__)\n"
    )
    result = _run([str(core / "python"), "-c", code], core)
    assert result.returncode == 0, result.stderr
    assert "site-packages" in result.stdout  # the installed copy, not a source tree
    assert (core / "freemark").exists()
    assert not (core / "freemark-keyserver").exists()


def test_a_receipt_verifies_offline_and_a_tampered_one_is_refused(
    core: Path, tmp_path: Path
) -> None:
    log = standard_log()
    pem = tmp_path / "ttp.pem"
    pem.write_bytes(log.signer.public_key_pem())
    good, bad = tmp_path / "receipt.json", tmp_path / "tampered.json"
    save_statement(good, log.receipt(0))
    save_statement(bad, replace(log.receipt(0), integrated_time=42))

    ok = _run([str(core / "freemark"), "receipt", "verify", str(good), "--public-key", str(pem)],
              tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK receipt")

    refused = _run([str(core / "freemark"), "receipt", "verify", str(bad), "--public-key",
                    str(pem)], tmp_path)
    assert refused.returncode == 1
    assert "FAILED" in refused.stderr and refused.stdout == ""


def test_attack_without_the_lab_says_how_to_install_it(core: Path, tmp_path: Path) -> None:
    result = _run([str(core / "freemark"), "attack", "--config", "quick"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pip install 'freemark[lab]'" in result.stderr
