"""Hugging Face checkpoints: each allow-listed type builds and round-trips through a packed
file; pickles, remote code, unknown types and absurd sizes are refused before anything is
built; sharded checkpoints load; the fingerprint is the weights'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from freemark.errors import ModelFileError
from freemark.formats import huggingface
from freemark.formats.local import load_model
from freemark.formats.pt2 import fingerprint
from freemark.formats.table import format_of
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 48, "vocab_size": 120, "max_position_embeddings": 64}
# model_type: (config class, model class, extra config, key layer)
CASES = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}, "bert.encoder.layer.1.intermediate"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {},
                "roberta.encoder.layer.1.intermediate"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {}, "encoder.layer.0.intermediate"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 48},
                   "distilbert.transformer.layer.1.ffn.lin1"),
}


def _save(folder: Path, model_type: str, seed: int = 0, **extra: Any) -> tuple[Path, str]:
    import transformers

    config_class, model_class, overrides, layer = CASES[model_type]
    values = {**TINY, **overrides, **extra}
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder, layer


def _tokens(n: int = 6, length: int = 9) -> TriggerSet:
    rng = np.random.default_rng(0)
    mask = np.ones((n, length), dtype=np.int64)
    mask[::2, 6:] = 0
    return TriggerSet(inputs=rng.integers(3, 100, size=(n, length)), attention_mask=mask)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_each_allowed_type_loads_packs_and_reads_a_layer(model_type: str, tmp_path: Path) -> None:
    import transformers

    folder, layer = _save(tmp_path / "ckpt", model_type)
    assert format_of(folder) == "hf"
    model = load_model(folder)
    reference = getattr(transformers, CASES[model_type][1]).from_pretrained(folder).eval()
    assert fingerprint(model) == fingerprint(reference)
    packed = huggingface.pack(folder, tmp_path / "packed.safetensors")
    assert (packed.stat().st_mode & 0o777) == 0o600
    assert format_of(packed) == "hf" and huggingface.is_packed(packed)
    assert huggingface.pack(folder, tmp_path / "twice.safetensors").read_bytes() == packed.read_bytes()
    again = huggingface.load_checkpoint(packed)
    assert fingerprint(again) == fingerprint(model)
    first, pooling = capture(model, layer, _tokens())
    second, _ = capture(again, layer, _tokens(), pooling=pooling)
    assert first.shape == (6, 48) and np.array_equal(first, second)


def test_sharded_checkpoints_load(tmp_path: Path) -> None:
    import transformers

    folder, _ = _save(tmp_path / "one", "bert")
    model = transformers.BertForSequenceClassification.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / huggingface.INDEX_NAME).is_file()
    assert fingerprint(huggingface.load_checkpoint(tmp_path / "sharded")) == fingerprint(model)
    packed = huggingface.pack(tmp_path / "sharded", tmp_path / "packed.safetensors")
    assert fingerprint(huggingface.load_checkpoint(packed)) == fingerprint(model)


def test_a_pickled_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    folder, _ = _save(tmp_path / "ckpt", "bert")
    state = huggingface.load_checkpoint(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="pytorch_model.bin is a pickle"):
        huggingface.load_checkpoint(folder)
    # the same bytes sent as a packed checkpoint: sniffed, never handed to a loader
    with pytest.raises(ModelFileError, match="pickled torch checkpoint"):
        huggingface.load_checkpoint(folder / "pytorch_model.bin")


def _config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(("changes", "words"), [
    ({"auto_map": {"AutoModel": "modeling_evil.Evil"}}, "remote code"),
    ({"trust_remote_code": True}, "remote code"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"architectures": ["BertForMaskedLM"]}, "must name one architecture"),
    ({"architectures": ["BertModel", "BertForSequenceClassification"]}, "one architecture"),
    ({"quantization_config": {"load_in_8bit": True}}, "quantized"),
    ({"is_decoder": True}, "only encoders"),
    ({"hidden_size": 8192, "num_hidden_layers": 96, "intermediate_size": 32768,
      "num_attention_heads": 64}, "parameters, over the cap"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000 is over the cap"),
    ({"num_hidden_layers": -1}, "positive integer"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"hidden_size": 33}, "multiple of num_attention_heads"),
])
def test_hostile_configs_are_refused_before_building(tmp_path: Path, changes: dict[str, Any],
                                                      words: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = _save(tmp_path / "ckpt", "bert")
    _config(folder, **changes)
    built: list[object] = []
    monkeypatch.setattr(huggingface, "build_model", lambda config: built.append(config))
    with pytest.raises(ModelFileError, match=words):
        huggingface.load_checkpoint(folder)
    with pytest.raises(ModelFileError, match=words):
        huggingface.pack(folder, tmp_path / "never.safetensors")
    assert not built and not (tmp_path / "never.safetensors").exists()


def test_weights_must_fit_the_config_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = _save(tmp_path / "ckpt", "bert")
    weights = load_file(str(folder / "model.safetensors"))
    weights["extra.weight"] = torch.zeros(3)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelFileError, match="unexpected"):
        huggingface.load_checkpoint(folder)
    _save(folder, "bert")
    _config(folder, intermediate_size=40)
    with pytest.raises(ModelFileError, match="has shape"):
        huggingface.load_checkpoint(folder)


def test_shards_outside_the_directory_are_refused(tmp_path: Path) -> None:
    folder, _ = _save(tmp_path / "ckpt", "bert")
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"bert.pooler.dense.weight": "../elsewhere.safetensors"}}
    (folder / huggingface.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="shards must be"):
        huggingface.load_checkpoint(folder)


def test_weights_only_safetensors_take_the_packed_architecture(tmp_path: Path) -> None:
    host, _ = _save(tmp_path / "host", "bert", seed=0)
    other, _ = _save(tmp_path / "other", "bert", seed=1)
    packed = huggingface.pack(host, tmp_path / "host.safetensors")
    assert format_of(other / "model.safetensors") == "safetensors"
    swapped = huggingface.apply_checkpoint_weights(packed, other / "model.safetensors")
    assert fingerprint(swapped) == fingerprint(huggingface.load_checkpoint(other))
    assert fingerprint(load_model(host, weights=other / "model.safetensors")) == fingerprint(swapped)
