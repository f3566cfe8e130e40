"""`freemark keygen --outputs` and `freemark extract` with an output key, on real model files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import blackbox_models as bm
from freemark.blackbox.key import save_output_key
from freemark.cli import main
from freemark.cli.outputs import PASSPHRASE_ENV
from freemark.formats.pt2 import save_program

SECRET = "a long enough passphrase"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("outputs")
    example = (torch.zeros(2, 1, 8, 8),)
    paths = {"host": folder / "host.pt2", "copy": folder / "copy.pt2",
             "independent": folder / "independent.pt2", "data": folder / "owner.npz",
             "key": folder / "alice.fmo"}
    save_program(bm.host(), example, paths["host"])
    save_program(bm.finetuned(), example, paths["copy"])
    save_program(bm.independents()[0], example, paths["independent"])
    for i, member in enumerate(bm.panel()):
        paths[f"r{i}"] = folder / f"r{i}.pt2"
        save_program(member, example, paths[f"r{i}"])
    np.savez(paths["data"], **bm.owner_npz_arrays())
    save_output_key(paths["key"], bm.output_key(), SECRET.encode())
    return paths


def _references(files: dict[str, Path], indices: range | list[int]) -> list[str]:
    return [arg for i in indices for arg in ("--reference", str(files[f"r{i}"]))]


def test_keygen_refuses_a_small_or_uniform_panel(files: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    base = ["keygen", "--outputs", "--model", str(files["host"]), "--data", str(files["data"]),
            "--owner", "alice", "--out", str(tmp_path / "k")]
    assert main([*base, *_references(files, range(7))]) == 2
    assert "at least 8 reference models" in capsys.readouterr().err
    same = [0, 2, 4, 6, 0, 2, 4, 6]  # eight files, one architecture
    assert main([*base, *_references(files, same)]) == 2
    assert "share one architecture" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_keygen_refuses_without_a_passphrase(files: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    assert main(["keygen", "--outputs", "--model", str(files["host"]), "--data",
                 str(files["data"]), "--owner", "a", "--out", str(tmp_path / "k"),
                 *_references(files, range(8))]) == 2
    assert PASSPHRASE_ENV in capsys.readouterr().err
    monkeypatch.setenv(PASSPHRASE_ENV, "short")
    assert main(["keygen", "--outputs", "--model", str(files["host"]), "--data",
                 str(files["data"]), "--owner", "a", "--out", str(tmp_path / "k"),
                 *_references(files, range(8))]) == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_keygen_outputs_writes_a_key_the_host_matches(files: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    out = tmp_path / "new.fmo"
    assert main(["keygen", "--outputs", "--model", str(files["host"]), "--data",
                 str(files["data"]), "--owner", "alice", "--queries", "16", "--sets", "1",
                 "--out", str(out), "--json", *_references(files, range(8))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sets"] == 1 and summary["input_shape"] == [1, 8, 8]
    assert summary["host_log10_p_labels"] < -5 and out.exists()


@pytest.mark.parametrize("labels_only", [True, False])
def test_extract_judges_a_file_through_its_outputs(files: dict[str, Path], labels_only: bool,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    flags = ["--labels-only"] if labels_only else []
    for suspect, outcome in (("copy", "match"), ("independent", "no_match")):
        assert main(["extract", "--key", str(files["key"]), "--model", str(files[suspect]),
                     "--json", *flags]) == 0
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["outcome"] == outcome
        assert len(verdict["tests"]) == (1 if labels_only else 3)
    assert main(["extract", "--key", str(files["key"]), "--model", str(files["copy"]),
                 "--reference", str(files["r0"])]) == 2
    assert "--reference" in capsys.readouterr().err
    monkeypatch.setenv(PASSPHRASE_ENV, "the wrong passphrase")
    assert main(["extract", "--key", str(files["key"]), "--model", str(files["copy"])]) == 2
    assert "wrong passphrase" in capsys.readouterr().err
