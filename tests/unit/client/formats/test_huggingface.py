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
from freemark.formats.pt2 import fingerprint, state_dict_of
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
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
    ({"architectures": ["BertForMaskedLM"]}, "must name one architecture"),
    ({"architectures": ["BertModel", "BertForSequenceClassification"]}, "one architecture"),
    ({"quantization_config": {"load_in_8bit": True}}, "quantized"),
    ({"is_decoder": True}, "as an encoder only"),
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


# Decoders: tiny random configs of every allow-listed family. model_type: (config class,
# base class, language-model class, config, key layer of the language-model class).
DECODER_CASES = {
    "gpt2": ("GPT2Config", "GPT2Model", "GPT2LMHeadModel",
             {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 48, "vocab_size": 120,
              "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2},
             "transformer.h.1.mlp.act"),
    "llama": ("LlamaConfig", "LlamaModel", "LlamaForCausalLM",
              {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2},
              "model.layers.1.mlp.act_fn"),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM",
              {**TINY, "num_attention_heads": 4, "num_key_value_heads": 1},
              "model.layers.1.mlp.act_fn"),
    "mistral": ("MistralConfig", "MistralModel", "MistralForCausalLM",
                {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4},
                "model.layers.1.mlp.act_fn"),
}


def _save_decoder(folder: Path, model_type: str, *, lm: bool = True, seed: int = 0,
                  **extra: Any) -> torch.nn.Module:
    import transformers

    config_class, base, head, values, _ = DECODER_CASES[model_type]
    config = getattr(transformers, config_class)(**{**values, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, head if lm else base)(config).eval()
    model.save_pretrained(folder)
    return model


def _stored_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return sorted(handle.keys())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", sorted(DECODER_CASES))
def test_each_decoder_family_loads_packs_and_reads_a_layer(model_type: str, tied: bool,
                                                            tmp_path: Path) -> None:
    reference = _save_decoder(tmp_path / "ckpt", model_type, tie_word_embeddings=tied)
    folder, layer = tmp_path / "ckpt", DECODER_CASES[model_type][4]
    head = "lm_head.weight"
    assert (head in _stored_names(folder)) is not tied  # save_pretrained writes a tie once
    model = load_model(folder)
    assert format_of(folder) == "hf"
    names = list(state_dict_of(model))
    assert (head in names) is not tied and len(names) == len(_stored_names(folder))
    assert fingerprint(model) == fingerprint(reference)
    if tied:  # the alias still shares the loaded weight
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    packed = huggingface.pack(folder, tmp_path / "packed.safetensors")
    again = huggingface.load_checkpoint(packed)
    assert fingerprint(again) == fingerprint(model)
    first, pooling = capture(model, layer, _tokens())
    second, _ = capture(again, layer, _tokens(), pooling=pooling)
    assert first.shape == (6, 48) and np.array_equal(first, second)
    # the fingerprint covers the tied weight: changing it changes the fingerprint
    with torch.no_grad():
        again.get_input_embeddings().weight[0, 0] += 1.0
    assert fingerprint(again) != fingerprint(model)


@pytest.mark.parametrize("model_type", sorted(DECODER_CASES))
def test_bare_decoders_load_and_tied_file_with_both_copies_is_refused(model_type: str,
                                                                      tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    reference = _save_decoder(tmp_path / "base", model_type, lm=False)
    assert fingerprint(huggingface.load_checkpoint(tmp_path / "base")) == fingerprint(reference)
    _save_decoder(tmp_path / "tied", model_type, tie_word_embeddings=True)
    weights = load_file(str(tmp_path / "tied" / "model.safetensors"))
    weights["lm_head.weight"] = next(v for k, v in weights.items() if "embed" in k or "wte" in k)
    save_file({k: v.clone() for k, v in weights.items()},
              str(tmp_path / "tied" / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"unexpected \['lm_head.weight'\]"):
        huggingface.load_checkpoint(tmp_path / "tied")


@pytest.mark.parametrize("model_type", sorted(DECODER_CASES))
def test_padding_side_leaves_decoder_activations_unchanged(model_type: str,
                                                           tmp_path: Path) -> None:
    _save_decoder(tmp_path / "ckpt", model_type)
    model = huggingface.load_checkpoint(tmp_path / "ckpt")
    right = _tokens()
    lengths = right.attention_mask.sum(axis=1)
    inputs = np.zeros_like(right.inputs)
    for row, length in enumerate(lengths):  # the same real tokens, padded on the left
        inputs[row, right.inputs.shape[1] - length:] = right.inputs[row, :length]
    left = TriggerSet(inputs=inputs, attention_mask=right.attention_mask[:, ::-1].copy())
    layer = DECODER_CASES[model_type][4]
    a, _ = capture(model, layer, right)
    b, _ = capture(model, layer, left)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model_type", "changes", "words"), [
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide"),
    ("llama", {"num_key_value_heads": 10**6}, "num_key_value_heads=1000000 is over the cap"),
    ("llama", {"head_dim": 10**9}, "head_dim=1000000000 is over the cap"),
    ("llama", {"head_dim": 7}, "even rotary dimension"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e400}},
     "rope_theta=inf must be a finite number"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}},
     "factor=-2.0 must be"),
    ("llama", {"rope_parameters": {"rope_type": "evil", "rope_theta": 1e4}},
     "rope_type 'evil' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "rope_theta": 5e5,
                                   "original_max_position_embeddings": 10**12}},
     "original_max_position_embeddings=1000000000000 must be"),
    ("llama", {"max_position_embeddings": 10**9}, "max_position_embeddings=1000000000 is over"),
    ("llama", {"hidden_act": "os.system"}, "not an activation"),
    ("llama", {"hidden_size": 8192, "num_hidden_layers": 96, "intermediate_size": 32768,
               "num_attention_heads": 64, "num_key_value_heads": 8}, "parameters, over the cap"),
    ("mistral", {"sliding_window": 10**12}, "sliding_window=1000000000000 is over the cap"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive integer"),
    ("qwen2", {"layer_types": ["chunked_attention"] * 2}, "layer_types must list"),
    ("qwen2", {"max_window_layers": 10**9}, "max_window_layers=1000000000 is over"),
    ("gpt2", {"n_positions": 10**9}, "n_positions=1000000000 is over the cap"),
    ("gpt2", {"n_ctx": 10**9}, "n_ctx=1000000000 is over the cap"),
    ("gpt2", {"n_embd": 10**6}, "n_embd=1000000 is over the cap"),
    ("gpt2", {"n_layer": 0}, "n_layer must be a positive integer"),
    ("gpt2", {"n_head": 10**4}, "n_head=10000 is over the cap"),
    ("gpt2", {"n_inner": 10**7}, "n_inner=10000000 is over the cap"),
    ("gpt2", {"n_embd": 33}, "not a multiple of n_head"),
    ("gpt2", {"add_cross_attention": True}, "cross-attention"),
    ("gpt2", {"activation_function": "no_such_thing"}, "not an activation"),
])
def test_hostile_decoder_configs_are_refused_before_building(
        tmp_path: Path, model_type: str, changes: dict[str, Any], words: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _save_decoder(tmp_path / "ckpt", model_type)
    _config(tmp_path / "ckpt", **changes)
    built: list[object] = []
    monkeypatch.setattr(huggingface, "build_model", lambda config: built.append(config))
    with pytest.raises(ModelFileError, match=words):
        huggingface.load_checkpoint(tmp_path / "ckpt")
    assert not built


def test_the_parameter_estimate_counts_decoders_closely(tmp_path: Path) -> None:
    for model_type in DECODER_CASES:
        for tied in (True, False):
            model = _save_decoder(tmp_path / model_type, model_type, tie_word_embeddings=tied)
            config = huggingface.check_config(huggingface.read_config(tmp_path / model_type),
                                              model_type)
            counted = sum(t.numel() for t in state_dict_of(model).values())
            estimate = huggingface.estimate_parameters(config, model_type)
            assert 0.9 * counted <= estimate <= counted, (model_type, tied, estimate, counted)


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_bf16_weights_load_memory_mapped_in_their_stored_dtype(tmp_path: Path) -> None:
    """~90 MB of bf16 weights: loaded without an anonymous copy, never upcast, and read
    the same twice (the key layer's readout is deterministic)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256,
        architectures=["LlamaForCausalLM"], dtype="bfloat16")
    folder = tmp_path / "big"
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    empty = huggingface.build_model(huggingface.check_config(config.to_dict(), folder))
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(t.shape, generator=generator) * 0.05).to(torch.bfloat16)
             for name, t in state_dict_of(empty).items()}
    save_file(state, str(folder / "model.safetensors"))
    weight_bytes = sum(t.numel() * 2 for t in state.values())
    del state, empty
    before = _rss_anon_kib()
    model = huggingface.load_checkpoint(folder)
    grown = (_rss_anon_kib() - before) * 1024
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert grown < weight_bytes / 4, (grown, weight_bytes)
    first, _ = capture(model, "model.layers.2.mlp.act_fn", _tokens())
    second, _ = capture(model, "model.layers.2.mlp.act_fn", _tokens())
    assert first.shape == (6, 1376) and np.all(np.isfinite(first))
    assert np.array_equal(first, second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_decoders_load_as_stored(dtype: torch.dtype, tmp_path: Path) -> None:
    reference = _save_decoder(tmp_path / "one", "qwen2", tie_word_embeddings=True).to(dtype)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / huggingface.INDEX_NAME).is_file()
    model = huggingface.load_checkpoint(tmp_path / "sharded")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert fingerprint(model) == fingerprint(reference)
    packed = huggingface.pack(tmp_path / "sharded", tmp_path / "packed.safetensors")
    again = huggingface.load_checkpoint(packed)
    assert fingerprint(again) == fingerprint(reference)
    layer = DECODER_CASES["qwen2"][4]
    np.testing.assert_array_equal(capture(model, layer, _tokens())[0],
                                  capture(again, layer, _tokens())[0])


def test_mixed_dtypes_run_in_the_dtype_of_most_bytes(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _save_decoder(tmp_path / "ckpt", "llama")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(path))
    save_file({k: v if "norm" in k else v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    model = huggingface.load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    activations, _ = capture(model, DECODER_CASES["llama"][4], _tokens())
    assert np.all(np.isfinite(activations))


def test_the_parameter_cap_is_a_setting(tmp_path: Path) -> None:
    model = _save_decoder(tmp_path / "ckpt", "mistral")
    counted = sum(t.numel() for t in state_dict_of(model).values())
    values = huggingface.read_config(tmp_path / "ckpt")
    with pytest.raises(ModelFileError, match=f"over the cap of {counted // 2:,}"):
        huggingface.load_checkpoint(tmp_path / "ckpt", max_parameters=counted // 2)
    assert huggingface.check_config(values, "ckpt", max_parameters=counted).model_type == "mistral"
    assert huggingface.MAX_PARAMETERS >= 1_500_000_000  # a 1.5 B decoder registers by default


def test_a_language_model_computes_last_position_logits_and_scans_without_them(
        tmp_path: Path) -> None:
    from freemark.scheme.activations import capture_every

    _save_decoder(tmp_path / "ckpt", "llama", vocab_size=120)
    model = huggingface.load_checkpoint(tmp_path / "ckpt")
    triggers = _tokens()
    with torch.no_grad():
        logits = model(torch.from_numpy(triggers.inputs),
                       torch.from_numpy(triggers.attention_mask)).logits
    assert tuple(logits.shape) == (6, 1, 120)
    scanned = dict(capture_every(model, triggers, width=0))
    layer = DECODER_CASES["llama"][4]
    expected, _ = capture(model, layer, triggers)
    np.testing.assert_allclose(scanned[layer], expected, rtol=1e-5, atol=1e-6)
    assert "lm_head" not in scanned  # one position's logits do not pool over the tokens
    assert set(dict(capture_every(model, triggers, width=48))) >= {layer}
