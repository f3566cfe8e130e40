"""The MiniLM task: deterministic sentences, token triggers with masks, and obfuscation that
is function-preserving on a real transformer layer."""

from __future__ import annotations

import pytest
import torch

from freemark.scheme.activations import capture
from freemark_lab.attacks import apply_attack
from freemark_lab.transformer import TextTask, sentences, text_task

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def task() -> TextTask:
    return text_task(n_train=40, n_test=16)


def test_sentences_are_deterministic_and_balanced():
    texts, labels = sentences(40, seed=3)
    assert (texts, labels.tolist()) == (sentences(40, seed=3)[0], sentences(40, seed=3)[1].tolist())
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert sentences(40, seed=4)[0] != texts


def test_token_triggers_carry_masks_and_read_the_intermediate_layer(task):
    triggers = task.triggers(2, 0)
    assert triggers.attention_mask is not None and len(triggers) == 8
    activations, _ = capture(task.new_model("pretrained", 0), task.layer, triggers)
    assert activations.shape == (8, 1536)


@pytest.mark.parametrize("kind, params", [
    ("permute", {"seed": 1}), ("dummy_units", {"count": 8, "mode": "split", "seed": 1})])
def test_obfuscation_is_function_preserving_on_minilm(task, kind, params):
    model = task.new_model("pretrained", 0).eval()
    attacked = apply_attack(kind, model, task, params).eval()
    with torch.no_grad():
        assert torch.allclose(attacked(*task.sample_inputs(8)), model(*task.sample_inputs(8)),
                              atol=TOLERANCE, rtol=0)


def test_rescaling_is_refused_across_gelu(task):
    with pytest.raises(ValueError, match="homogeneous"):
        apply_attack("rescale", task.new_model("pretrained", 0), task, {})
