"""`freemark attack` where the lab (freemark[lab]) is not installed: one line saying how to get it."""

from __future__ import annotations

import sys

import pytest

from freemark.cli import main


@pytest.mark.parametrize("argv", [["--config", "quick"], ["-h"], []])
def test_attack_without_the_lab_says_how_to_install_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "freemark_lab.attack_cli", None)  # import raises ImportError
    assert main(["attack", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "pip install 'freemark[lab]'" in captured.err
