"""The built-in robustness suites, shipped as package data: `freemark attack --config quick`.

`digits`, `mnist` and `minilm` are the full suites whose reports are committed under
docs/robustness/ (bench/robustness.py runs them); `quick` is the smoke suite the tests run.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN = ("digits", "minilm", "mnist", "quick")


def config_path(name_or_path: str | Path) -> Path:
    """A built-in suite's TOML file by name, or `name_or_path` itself when it is not one."""
    if str(name_or_path) in BUILTIN:
        # The lab is installed as files (never zipped), so the resource is a real path.
        return Path(str(resources.files(__name__).joinpath(f"{name_or_path}.toml")))
    return Path(name_or_path)
