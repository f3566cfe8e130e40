"""The quick robustness suite on the digits CNN, through the `freemark attack` entry point.

What the issues ask the suite to show: fine-tuning, 50 % pruning, int8 and fp16 are
detected at calibrated p ≤ 1e-9; no held-out independent model reaches p ≤ 1e-3 under the
plain, the aligned or the combined test; structural obfuscation (permutation, split dummy
units, all of them on a fine-tuned copy) defeats the plain test and is caught by the
aligned test calibrated on the three-model panel; the report files exist and the PNG is
a real plot.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freemark_lab import attack_cli

CONFIG = "quick"  # the built-in suite, read from the lab's package data
DETECTION_LOG10 = -9.0
UNIQUENESS_LOG10 = -3.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("robustness")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = attack_cli.main(["--config", CONFIG, "--quick", "--out", str(out), "--json"])
    assert status == 0
    return json.loads(stdout.getvalue()), out


def rows(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    found = [r for r in report["attacks"] if r["kind"] == kind]
    assert found, f"the quick suite has no {kind} attack"
    return found


@pytest.mark.parametrize("kind", ["finetune", "int8", "fp16"])
def test_removal_attacks_are_detected(run, kind):
    for row in rows(run[0], kind):
        assert row["status"] == "detected"
        assert row["verdict"]["log10_p_value"] <= DETECTION_LOG10


def test_half_of_the_weights_pruned_is_detected(run):
    pruned = [r for r in rows(run[0], "magnitude_prune") if r["params"]["rate"] == 0.5]
    assert pruned and all(r["verdict"]["log10_p_value"] <= DETECTION_LOG10 for r in pruned)


def test_no_independent_model_matches(run):
    independent = [n for n in run[0]["nulls"] if n["independent"]]
    assert len(independent) >= 3
    for null in independent:
        for figure in ("plain_log10_p", "aligned_log10_p", "combined_log10_p", "plain_alone_log10_p"):
            assert null[figure] >= UNIQUENESS_LOG10, figure
        assert null["outcome"] == "no_match"
        assert not null["verdict"]["is_match"]
    assert run[0]["false_positives"] == 0


def test_the_panel_is_disjoint_from_the_nulls(run):
    panel = run[0]["panel"]
    assert len(panel["seeds"]) >= 3 and panel["digest"]
    assert not set(panel["seeds"]) & {n["seed"] for n in run[0]["nulls"]}


@pytest.mark.parametrize("kind", ["permute", "dummy_units", "combine"])
def test_obfuscation_defeats_the_plain_test_and_the_aligned_test_catches_it(run, kind):
    """The threat (a free relabelling or widening hides the mark from the plain test) and its
    counter: the aligned test, calibrated on the panel, decides the combined verdict."""
    for row in rows(run[0], kind):
        assert row["plain_log10_p"] > DETECTION_LOG10
        assert row["plain_alone_log10_p"] is None or row["plain_alone_log10_p"] > DETECTION_LOG10
        assert row["aligned_log10_p"] <= DETECTION_LOG10
        assert row["aligned_matched_units"] > row["aligned_host_units"] // 2
        assert row["outcome"] == "match" and row["status"] == "detected"


def test_host_and_ambiguity_sections(run):
    report = run[0]
    assert report["host_verdict"]["ber"] == 0.0
    overwrite = report["overwrite"]
    assert overwrite["attacker_registration"].startswith("refused")
    assert overwrite["owner_of_copy"].startswith("owner@")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_files_are_written_and_the_png_is_a_real_plot(run):
    report, out = run
    name = report["name"]
    text = (out / f"{name}.txt").read_text(encoding="utf-8")
    assert "magnitude prune 50%" in text and "Held-out null models" in text and "aligned T/M" in text
    assert json.loads((out / f"{name}.json").read_text(encoding="utf-8"))["name"] == name
    data = (out / f"{name}.png").read_bytes()
    width, height = png_size(data)
    assert width > 200 and height > 200
    assert 10_000 < len(data) < 5_000_000
    from matplotlib import image

    pixels = image.imread(out / f"{name}.png")
    colours = np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 8
