"""The scheme's CLI on real files: triggers, keygen and extract, tables and --json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freemark.cli import main
from freemark.formats.pt2 import save_program
from freemark.scheme.bundle import load_bundle
from freemark_lab import data, models, train

VERDICT_FIELDS = {"n_bits", "matches", "ber", "p_value", "p_value_binomial", "alpha", "is_match"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    ds = data.digits()
    host = train.trained(models.DigitsCNN, ds.x_train, ds.y_train, epochs=10, seed=1)
    other = train.trained(models.DigitsCNN, ds.x_train, ds.y_train, epochs=10, seed=2)
    paths = {"host": folder / "host.pt2", "other": folder / "other.pt2",
             "dataset": folder / "train.npz", "triggers": folder / "triggers.npz",
             "key": folder / "key.fmk"}
    save_program(host, (torch.zeros(2, 1, 8, 8),), paths["host"])
    save_program(other, (torch.zeros(2, 1, 8, 8),), paths["other"])
    np.savez(paths["dataset"], x=ds.x_train, y=ds.y_train)
    return paths


def test_triggers_keygen_extract(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triggers", "--data", str(files["dataset"]), "--per-class", "5",
                 "--out", str(files["triggers"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_triggers"] == 50

    assert main(["keygen", "--model", str(files["host"]), "--layer", "act", "--triggers",
                 str(files["triggers"]), "--owner", "alice", "--bits", "128",
                 "--out", str(files["key"]), "--json"]) == 0
    keygen = json.loads(capsys.readouterr().out)
    assert keygen["host_ber"] == 0.0 and keygen["n_bits"] == 128 and keygen["probes"] == 1024

    assert main(["extract", "--model", str(files["host"]), "--key", str(files["key"]), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert VERDICT_FIELDS <= set(verdict) and verdict["is_match"] is True

    assert main(["extract", "--model", str(files["other"]), "--key", str(files["key"])]) == 0
    table = capsys.readouterr().out
    assert "watermark not found" in table and "p_value_binomial" in table


def test_errors_are_one_line_with_exit_2(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a model")
    assert main(["extract", "--model", str(garbage), "--key", str(files["key"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freemark: error:") and len(err.strip().splitlines()) == 1
    assert main(["keygen", "--model", str(files["host"]), "--layer", "nope", "--triggers",
                 str(files["triggers"]), "--owner", "a", "--out", str(tmp_path / "k.fmk")]) == 2
    assert "valid layers" in capsys.readouterr().err


@pytest.mark.parametrize("probes", [0, 64])
def test_keygen_sets_the_keys_alignment_probes(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               probes: int) -> None:
    """`--probes N` sizes the probe profile a key carries (fewer for a large model, whose
    every probe is a forward pass at the key server); 0 makes a key without an aligned test."""
    if not files["triggers"].exists():
        assert main(["triggers", "--data", str(files["dataset"]), "--per-class", "5",
                     "--out", str(files["triggers"])]) == 0
    key = tmp_path / "key.fmk"
    assert main(["keygen", "--model", str(files["host"]), "--layer", "act", "--triggers",
                 str(files["triggers"]), "--owner", "alice", "--probes", str(probes),
                 "--out", str(key), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probes"] == probes
    profile = load_bundle(key).probe_profile
    assert (profile is None) if probes == 0 else (profile is not None and len(profile) == probes)


@pytest.mark.parametrize("probes", ["1", "-3", "8193"])
def test_keygen_refuses_a_probe_count_out_of_range(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   probes: str) -> None:
    if not files["triggers"].exists():
        assert main(["triggers", "--data", str(files["dataset"]), "--per-class", "5",
                     "--out", str(files["triggers"])]) == 0
    assert main(["keygen", "--model", str(files["host"]), "--layer", "act", "--triggers",
                 str(files["triggers"]), "--owner", "alice", "--probes", probes,
                 "--out", str(tmp_path / "key.fmk")]) == 2
    assert "probe count must be in [2, 8192] (or 0" in capsys.readouterr().err
    assert not (tmp_path / "key.fmk").exists()
