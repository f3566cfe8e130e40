"""Transformer layers: token outputs are mean-pooled with padding masked out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freemark import derive_key, extract
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tokens(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 200, size=(n, length))
    lengths = rng.integers(4, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def test_padding_does_not_change_pooled_activations(bert: torch.nn.Module) -> None:
    ids, mask = _tokens(12, 10)
    short, pooling = capture(bert, "encoder.layer.1.intermediate", TriggerSet(ids, mask))
    assert pooling == bundle_pb2.POOLING_TOKEN_MEAN and short.shape == (12, 128)
    padded_ids = np.concatenate([ids, np.zeros((12, 6), dtype=ids.dtype)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((12, 6), dtype=mask.dtype)], axis=1)
    padded, _ = capture(bert, "encoder.layer.1.intermediate", TriggerSet(padded_ids, padded_mask))
    assert np.allclose(short, padded, atol=1e-4)


def test_a_key_on_a_transformer_layer_round_trips(bert: torch.nn.Module) -> None:
    ids, mask = _tokens(30, 12, seed=1)
    bundle = derive_key(bert, layer="encoder.layer.1.intermediate", triggers=TriggerSet(ids, mask),
                        owner="alice", n_bits=128)
    verdict = extract(bert, bundle)
    assert verdict.ber == 0.0 and verdict.is_match
