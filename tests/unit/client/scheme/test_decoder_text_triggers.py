"""Text triggers for decoders: a decoder's own tokenizer (byte-level BPE, no pad token, as
GPT-2's and Llama's) pads with its end-of-sequence token on the right whatever its own
padding side; the key layer, named by module, is read mean-pooled over real tokens only;
the CLI writes the set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from decoder_fixtures import stdlib_text, tokenizer_dir
from freemark.cli import main
from freemark.errors import InvalidInputError
from freemark.formats import huggingface
from freemark.scheme.activations import capture
from freemark.scheme.text_triggers import load_tokenizer, text_triggers
from freemark.scheme.triggers import TriggerSet, load_triggers

LAYER = "model.layers.1.mlp.act_fn"


@pytest.fixture(scope="module")
def decoder_tokenizer() -> Path:
    return tokenizer_dir()


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(stdlib_text()[:40]) + "\n", encoding="utf-8")
    return path


def test_a_tokenizer_without_pad_token_pads_with_eos_on_the_right(
        decoder_tokenizer: Path, sentences: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(decoder_tokenizer)
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    triggers = text_triggers(sentences, decoder_tokenizer, count=12, max_length=24, seed=3)
    mask = triggers.attention_mask
    assert mask is not None and (mask == 0).any() and mask[:, 0].all()
    assert np.all(np.diff(mask, axis=1) <= 0)  # real tokens first, padding after
    assert np.all(triggers.inputs[mask == 0] == tokenizer.eos_token_id)
    # a tokenizer that pads on the left by its own settings makes the same set
    left = tmp_path / "left"
    shutil.copytree(decoder_tokenizer, left)
    settings = json.loads((left / "tokenizer_config.json").read_text())
    settings["padding_side"] = "left"
    (left / "tokenizer_config.json").write_text(json.dumps(settings))
    assert load_tokenizer(left).padding_side == "left"
    again = text_triggers(sentences, left, count=12, max_length=24, seed=3)
    assert np.array_equal(again.inputs, triggers.inputs)
    assert again.attention_mask is not None and np.array_equal(again.attention_mask, mask)


def test_a_tokenizer_with_nothing_to_pad_with_is_refused(decoder_tokenizer: Path,
                                                         sentences: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(decoder_tokenizer, bare)
    settings = json.loads((bare / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token", "unk_token", "pad_token"):
        settings.pop(key, None)
    (bare / "tokenizer_config.json").write_text(json.dumps(settings))
    (bare / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(InvalidInputError, match="neither a pad token nor an end-of-sequence"):
        text_triggers(sentences, bare, count=4)


def test_decoder_activations_are_pooled_over_real_tokens_only(decoder_tokenizer: Path,
                                                              sentences: Path,
                                                              tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(load_tokenizer(decoder_tokenizer)), hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    model = huggingface.load_checkpoint(tmp_path / "ckpt")
    triggers = text_triggers(sentences, decoder_tokenizer, count=8, max_length=24, seed=1)
    assert triggers.attention_mask is not None
    pooled, _ = capture(model, LAYER, triggers)
    for row, (ids, mask) in enumerate(zip(triggers.inputs, triggers.attention_mask)):
        real = ids[mask == 1][None]  # the sentence alone, unpadded
        alone, _ = capture(model, LAYER, TriggerSet(inputs=real, attention_mask=np.ones_like(real)))
        np.testing.assert_allclose(pooled[row], alone[0], rtol=1e-5, atol=1e-6)


def test_the_cli_makes_decoder_text_triggers(decoder_tokenizer: Path, sentences: Path,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.npz"
    assert main(["triggers", "--text", str(sentences), "--tokenizer", str(decoder_tokenizer),
                 "--count", "10", "--max-length", "20", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_triggers"] == 10
    written = load_triggers(out)
    assert written.inputs.shape[0] == 10 and written.inputs.shape[1] <= 20
