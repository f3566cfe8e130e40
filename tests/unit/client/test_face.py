"""The lazy face: every public name resolves to what its module defines, also after the
submodule of the same name was imported (`freemark.extract` is the function, as before)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import freemark


def test_every_public_name_resolves_to_its_definition() -> None:
    for name in freemark.__all__:
        module = importlib.import_module(freemark._WHERE[name])
        assert getattr(freemark, name) is getattr(module, name), name


def test_a_submodule_named_like_a_function_does_not_replace_it() -> None:
    code = ("import freemark, freemark.extract, types\n"
            "from freemark import extract\n"
            "from freemark.extract import judge_activations\n"
            "assert callable(extract) and not isinstance(freemark.extract, types.ModuleType)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
