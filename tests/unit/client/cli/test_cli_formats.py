"""`freemark keygen/extract` on a Hugging Face checkpoint directory and on ONNX, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freemark.cli import main
from freemark.scheme.triggers import TriggerSet, save_triggers

LAYER = "bert.encoder.layer.1.intermediate"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small BERT classifier as a directory and as ONNX, and token triggers."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("cli-formats")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        vocab_size=200, max_position_embeddings=64, num_labels=3)).eval()
    model.save_pretrained(folder / "host")
    rng = np.random.default_rng(0)
    mask = np.ones((24, 12), dtype=np.int64)
    mask[::3, 8:] = 0
    ids = rng.integers(3, 190, size=(24, 12))
    save_triggers(folder / "triggers.npz", TriggerSet(inputs=ids, attention_mask=mask))
    axes = {0: "batch", 1: "tokens"}
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    torch.onnx.export(model, example, str(folder / "host.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return folder / "host", folder / "host.onnx", folder / "triggers.npz"


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_keygen_and_extract_on_a_directory_and_its_onnx(checkpoint: tuple[Path, Path, Path],
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    directory, onnx_file, triggers = checkpoint
    key = tmp_path / "k.fmk"
    assert main(["keygen", "--model", str(directory), "--layer", LAYER, "--triggers",
                 str(triggers), "--owner", "alice", "--bits", "64", "--out", str(key),
                 "--json"]) == 0
    assert _json(capsys)["host_ber"] == 0.0
    for suspect in (directory, onnx_file):
        assert main(["extract", "--model", str(suspect), "--key", str(key), "--json"]) == 0
        verdict = _json(capsys)
        assert verdict["outcome"] == "match" and verdict["matches"] == 64, suspect
    assert main(["extract", "--model", str(directory), "--key", str(key),
                 "--onnx-tensor", "x"]) == 2
    assert "ONNX suspects only" in capsys.readouterr().err
    assert main(["extract", "--model", str(onnx_file), "--key", str(key),
                 "--onnx-tensor", "missing"]) == 2
    assert "no node of the graph outputs a tensor named 'missing'" in capsys.readouterr().err


def test_a_pickled_only_directory_is_refused_with_the_fix(checkpoint: tuple[Path, Path, Path],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    directory, _, triggers = checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((directory / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    assert main(["keygen", "--model", str(pickled), "--layer", LAYER, "--triggers", str(triggers),
                 "--owner", "alice", "--out", str(tmp_path / "k.fmk")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin is a pickle" in err and "save_pretrained" in err
    assert not (tmp_path / "k.fmk").exists()
