"""GGUF suspects: every supported tensor type round-trips from tiny random llama, mistral,
qwen2 and gpt2 models (built with transformers, converted as llama.cpp's converter does) back into the
registered architecture; the Q4_K test encoder is what gguf decodes; hostile headers, blocks,
types and architectures are refused by the reader before anything is built for them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import hostile_gguf
from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats import gguf, huggingface
from freemark.formats.local import load_model
from freemark.formats.pt2 import state_dict_of
from freemark.formats.table import format_of
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2
from gguf_fixtures import ENCODERS, write_gguf

# Rows of 256 values, so every 2-d tensor fits Q4_K's 256-value blocks as well as the others.
HIDDEN, INNER, VOCAB = 256, 512, 300
# model_type: (config class, model class, config, key layer)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": INNER, "vocab_size": VOCAB,
               "max_position_embeddings": 64}, "model.layers.1.mlp.act_fn"),
    # llama.cpp writes Mistral as llama (and permutes its Q/K rows the same way)
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 1, "intermediate_size": INNER, "vocab_size": VOCAB,
                 "max_position_embeddings": 64, "sliding_window": 32},
                "model.layers.1.mlp.act_fn"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": INNER, "vocab_size": VOCAB,
               "max_position_embeddings": 64, "tie_word_embeddings": True},
              "model.layers.1.mlp.act_fn"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "n_inner": INNER, "vocab_size": VOCAB,
              "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
             "transformer.h.1.mlp.act"),
}
# How far a dequantized weight may stray, relative to its tensor's largest magnitude.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.1,
             "Q5_0": 0.08, "Q5_1": 0.05, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03,
             "Q4_K_M": 0.1}
# The least cosine between the key layer's pooled activations on the GGUF and on the host
# (random weights: 4-bit grids move them most).
COSINE = {"F32": 0.99999, "F16": 0.9999, "BF16": 0.999, "Q8_0": 0.999, "Q4_0": 0.95,
          "Q4_1": 0.95, "Q5_0": 0.98, "Q5_1": 0.98, "Q4_K": 0.95, "Q5_K": 0.98, "Q6_K": 0.995,
          "Q4_K_M": 0.95}


def _save(folder: Path, family: str, seed: int = 0, **extra: Any) -> Path:
    import transformers

    config_class, model_class, values, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(
        **{**values, **extra}))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each family's checkpoint directory and its packed file (what the key server stores)."""
    folder = tmp_path_factory.mktemp("gguf-hosts")
    out = {}
    for family in FAMILIES:
        directory = _save(folder / family, family)
        out[family] = directory, huggingface.pack(directory, folder / f"{family}.safetensors")
    return out


def _tokens() -> TriggerSet:
    rng = np.random.default_rng(1)
    mask = np.ones((4, 10), dtype=np.int64)
    mask[1, 7:] = 0
    return TriggerSet(inputs=rng.integers(3, VOCAB, size=(4, 10)), attention_mask=mask)


def _open(packed: Path, path: Path, layer: str) -> Callable[[TriggerSet], Any]:
    _, run = gguf.open_untrusted(packed, weights=path, layer=layer,
                                 pooling=bundle_pb2.POOLING_TOKEN_MEAN)
    return run


# Each test encoder's sub-block size and grid steps (the grid spans a sub-block's values).
GRIDS = {"Q4_K": (32, 15, "affine"), "Q5_K": (32, 31, "affine"), "Q6_K": (16, 31, "symmetric")}


@pytest.mark.parametrize("type_name", sorted(ENCODERS))
def test_the_test_encoders_write_what_ggufs_dequantizer_reads(type_name: str) -> None:
    """Round trip through `gguf.quants.dequantize`: each value within one step of its
    sub-block's grid (the grid's scale, and Q4_K's offset, are themselves rounded to the
    block's 6- or 8-bit multiples), zeros stay zeros, and the byte shape is gguf's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    kind = GGMLQuantizationType[type_name]
    size, steps, grid = GRIDS[type_name]
    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(6, 512)) * rng.uniform(0.01, 3, size=(6, 1))
            + rng.normal(size=(6, 1))).astype(np.float32)
    rows[5] = 0.0
    blocks = ENCODERS[type_name](rows)
    assert blocks.shape == quant_shape_to_byte_shape(rows.shape, kind)
    back = dequantize(blocks, kind)
    sub = rows.reshape(6, -1, size)
    if grid == "affine":
        step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / steps
    else:
        step = np.abs(sub).max(-1) / steps
    error = np.abs(back.reshape(6, -1, size) - sub).max(-1)
    assert np.all(error <= step + 1e-6)
    assert np.all(back[5] == 0.0)
    assert np.corrcoef(rows[:5].ravel(), back[:5].ravel())[0, 1] > 0.99


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_supported_type_reads_back_into_the_registered_architecture(
        family: str, hosts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """Each type's file dequantizes, is renamed, un-transposed and un-permuted back into the
    host's tensors (to the type's precision), and F32 computes exactly the host's
    activations: llama's Q/K row permutation is undone, GPT-2's Conv1D transpose too, and a
    tied head is read from the embedding."""
    directory, packed = hosts[family]
    layer = FAMILIES[family][3]
    host = huggingface.load_checkpoint(directory)
    expected = state_dict_of(host)
    triggers = _tokens()
    reference = capture(host, layer, triggers, pooling=bundle_pb2.POOLING_TOKEN_MEAN)[0]
    for type_name in (*gguf.SUPPORTED_TYPES, "Q4_K_M"):
        path = write_gguf(directory, tmp_path / f"{type_name}.gguf", type_name)
        assert format_of(path) == "gguf"
        suspect = gguf.read_gguf(path)
        config = gguf.judged_config(json.loads((directory / "config.json").read_text()), suspect,
                                     path)
        model = huggingface.build_model(config)
        state = gguf.suspect_state(model, config, suspect, path)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            scale = float(value.abs().max()) or 1.0
            assert float((state[key] - value).abs().max()) <= TOLERANCE[type_name] * scale, key
        activations = _open(packed, path, layer)(triggers)
        if type_name == "F32":
            np.testing.assert_allclose(activations, reference, rtol=1e-5, atol=1e-6)
        cosine = float(np.dot(activations.ravel(), reference.ravel())
                       / np.linalg.norm(activations) / np.linalg.norm(reference))
        assert cosine >= COSINE[type_name], (type_name, cosine)


def test_a_gguf_is_not_a_model_on_its_own_here(hosts: dict[str, tuple[Path, Path]],
                                               tmp_path: Path) -> None:
    """A GGUF has no architecture of its own here: alone it is refused with the two ways to
    read it, and in the sandbox it is refused without a host."""
    path = write_gguf(hosts["llama"][0], tmp_path / "s.gguf", "Q8_0")
    with pytest.raises(InvalidInputError, match="--weights X.gguf.*freemark verify --model X.gguf"):
        load_model(path)
    with pytest.raises(ModelFileError, match="registered Hugging Face checkpoint"):
        gguf.open_untrusted(path, layer="model.layers.1.mlp.act_fn", pooling=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_owner_reads_a_gguf_in_the_architecture_of_his_checkpoint(
        family: str, hosts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """`load_model(HOST_DIR, weights=X.gguf)` (the CLI's `extract --model HOST_DIR --weights
    X.gguf`) is the sandbox's read, in the owner's process: the same activations as the key
    server computes from the packed host, and the same refusal for a GGUF of another size."""
    directory, packed = hosts[family]
    layer = FAMILIES[family][3]
    path = write_gguf(directory, tmp_path / "s.gguf", "Q8_0")
    local = capture(load_model(directory, weights=path), layer, _tokens(),
                    pooling=bundle_pb2.POOLING_TOKEN_MEAN)[0]
    np.testing.assert_allclose(local, _open(packed, path, layer)(_tokens()), rtol=1e-5, atol=1e-6)
    wider = _save(tmp_path / "wider", family, **({"n_inner": 2 * INNER} if family == "gpt2"
                                                 else {"intermediate_size": 2 * INNER}))
    with pytest.raises(ModelFileError, match="architecture is not the registered host.s"):
        load_model(wider, weights=path)


HOSTILE: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "tensor-count bomb": (lambda _, dst: hostile_gguf.tensor_count_bomb(dst),
                          "declares 9,223,372,036,854,775,808 tensors"),
    "key/value-count bomb": (lambda _, dst: hostile_gguf.kv_count_bomb(dst),
                             "9,223,372,036,854,775,807 metadata entries"),
    "string of 2^62 bytes": (lambda _, dst: hostile_gguf.string_bomb(dst),
                             "'general.name' declares 4,611,686,018,427,387,904 bytes"),
    "array of 2^40 items": (lambda _, dst: hostile_gguf.array_bomb(dst),
                            "declares 1,099,511,627,776 items"),
    "2^21 tokenizer strings": (lambda _, dst: hostile_gguf.string_array_bomb(dst),
                               "'tokenizer.ggml.tokens' declares 2,097,152 items"),
    "Q4_0 blocks declared Q8_0": (
        lambda src, dst: hostile_gguf.retyped(src, dst, "blk.0.ffn_up.weight", "Q8_0"),
        "tensor 'blk.0.ffn_up.weight' .* as Q8_0"),
    "last tensor's F32 declared F16": (
        lambda src, dst: hostile_gguf.retyped(src, dst, "output_norm.weight", "F16"),
        "and the file at byte"),
    "rows of partial blocks": (
        lambda src, dst: hostile_gguf.redimensioned(src, dst, "blk.0.ffn_up.weight", (250,)),
        "whole blocks of 32 values, and its rows declare 250"),
    "a tensor declared twice its bytes": (
        lambda src, dst: hostile_gguf.redimensioned(src, dst, "blk.0.ffn_up.weight", (512,)),
        "does not fit the bytes"),
    "dims of 2^40 x 2^40": (
        lambda src, dst: hostile_gguf.redimensioned(src, dst, "blk.0.ffn_up.weight",
                                                    (1 << 40, 1 << 40)),
        "declares over 17,179,869,184 elements"),
    "unsupported type": (
        lambda src, dst: hostile_gguf.unsupported_type(src, dst, "blk.0.ffn_up.weight"),
        ("'blk.0.ffn_up.weight' is Q3_K; supported tensor types: F32, F16, BF16, Q8_0, Q4_0, "
         "Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K")),
    "unsupported architecture": (lambda src, dst: hostile_gguf.other_architecture(src, dst),
                                 "general.architecture 'bloom' is not supported"),
}


@pytest.fixture(scope="module")
def q4_0(hosts: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(hosts["llama"][0], tmp_path_factory.mktemp("q4") / "q4.gguf", "Q4_0")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_by_the_reader(case: str, q4_0: Path, tmp_path: Path) -> None:
    build, message = HOSTILE[case]
    path = build(q4_0, tmp_path / "hostile.gguf")
    with pytest.raises(ModelFileError, match=message):
        gguf.read_gguf(path)


def test_a_gguf_of_another_architecture_than_the_registration_is_refused(
        hosts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """A qwen2 GGUF against a llama registration, and a llama GGUF of other sizes (wider
    MLP, fewer KV heads), are refused naming what differs."""
    packed = hosts["llama"][1]
    qwen = write_gguf(hosts["qwen2"][0], tmp_path / "qwen.gguf", "Q8_0")
    other = write_gguf(_save(tmp_path / "other", "llama", intermediate_size=768,
                             num_key_value_heads=1), tmp_path / "other.gguf", "Q8_0")
    layer = FAMILIES["llama"][3]
    with pytest.raises(ModelFileError, match="a qwen2 model and the registered host a llama"):
        _open(packed, qwen, layer)
    with pytest.raises(ModelFileError, match=r"num_key_value_heads 1 \(host 2\), "
                                             r"intermediate_size 768 \(host 512\)"):
        _open(packed, other, layer)
