"""Every model the project registers and verifies passes vetting as a `.pt2` file; a model that
needs an operator off the allow-list is refused with the operator's name.

Decoder language models (Llama, Qwen2, Mistral with grouped-query attention, GPT-2 whose token
ids go through a `view`) vet and run as their owners export them, `model(input_ids,
attention_mask)`: tiny configs with random weights, since the operators do not depend on the
weights. RoBERTa, whose position ids are computed from the token ids, stays refused.

The files go through `save_program` and `load_program`, the way owners upload and the sandbox
reads them. EfficientNet-Lite0 is the lab's pretrained one (a lab dependency); ccexam's
MNISTNet (ASSETS.md) is checked where installed: it is an input of
scripts/derive_vetting_allowlist.py, not a dependency.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from torch import nn

from freemark.errors import ModelFileError
from freemark.formats.pt2 import load_program, save_program
from freemark.formats.pt2_vetting import vet_program
from freemark.scheme.activations import capture
from freemark.scheme.triggers import TriggerSet
from freemark_lab import models

IMAGES_8 = (torch.zeros(2, 1, 8, 8),)
IMAGES_28 = (torch.zeros(2, 1, 28, 28),)


def _minilm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from freemark_lab.transformer import MAX_TOKENS, TextClassifier, load_minilm

    _, bert = load_minilm()
    mask = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    mask[1, MAX_TOKENS // 2 :] = 0
    return TextClassifier(bert, 4), (torch.arange(2 * MAX_TOKENS).reshape(2, -1), mask)


def _efficientnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from freemark_lab.imagenet import IMAGE_SIZE, load_efficientnet_lite0

    return load_efficientnet_lite0(), (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),)


def _mnistnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from ccexam.models import MNISTNet

    return MNISTNet(28), IMAGES_28


def _installed(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "digits": lambda: (models.DigitsCNN(), IMAGES_8),
    "digits-student": lambda: (models.digits_student(), IMAGES_8),
    "mnist": lambda: (models.MnistCNN(), IMAGES_28),
    "mnist-student": lambda: (models.MnistStudentCNN(), IMAGES_28),
    "minilm": _minilm,
    "efficientnet-lite0": _efficientnet,
    "ccexam-mnistnet": _mnistnet,
}
MARKS = {"ccexam-mnistnet": _installed("ccexam")}


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, ())) for n in MODELS])
def test_project_model_passes_vetting_as_uploaded(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, example = MODELS[name]()
    path = tmp_path / f"{name}.pt2"
    save_program(model, example, path)
    vet_program(load_program(path))


class _Sorts(models.DigitsCNN):
    """Stands for a new architecture that needs an operator no listed model uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.sort(x, dim=-1).values)


def test_a_model_needing_an_unlisted_operator_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "sorts.pt2"
    save_program(_Sorts(), IMAGES_8, path)
    with pytest.raises(ModelFileError, match=r"calls aten::sort.default, which is not on the sandbox's "
                       r"allow-list .*Extending the operator allow-list"):
        vet_program(load_program(path))


class _Tokens(nn.Module):
    """A Hugging Face model as its owner exports it: `model(input_ids, attention_mask)`."""

    def __init__(self, config: hf.PretrainedConfig) -> None:
        super().__init__()
        self.model = hf.AutoModel.from_config(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
         "intermediate_size": 128, "vocab_size": 512}
GQA = {**SMALL, "num_key_value_heads": 1}
# family -> (its config, the key layer an owner would name: a middle MLP's activation)
DECODERS: dict[str, tuple[Callable[[], hf.PretrainedConfig], str]] = {
    "llama": (lambda: hf.LlamaConfig(**GQA), "model.layers.1.mlp.act_fn"),
    "qwen2": (lambda: hf.Qwen2Config(**GQA), "model.layers.1.mlp.act_fn"),
    "mistral": (lambda: hf.MistralConfig(sliding_window=8, **GQA), "model.layers.1.mlp.act_fn"),
    "gpt2": (lambda: hf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512),
             "model.h.1.mlp.act"),
}


def _token_batch(rows: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 512, size=(rows, length))
    mask = np.ones((rows, length), dtype=np.int64)
    mask[1, length // 2 :] = 0  # padding, so the masking path is exported and run
    return ids, mask


@pytest.mark.parametrize("family", DECODERS)
def test_a_decoder_program_vets_and_runs_as_uploaded(family: str, tmp_path: Path) -> None:
    """Uploaded as `save_program` writes it (dynamic batch), vetted, then run on a batch of
    another size the way the sandbox captures a key layer: the activations are the model's."""
    config, layer = DECODERS[family]
    torch.manual_seed(0)
    model = _Tokens(config()).eval()
    path = tmp_path / f"{family}.pt2"
    save_program(model, tuple(torch.from_numpy(a) for a in _token_batch(2, 16, seed=0)), path)
    program = load_program(path)
    vet_program(program)
    ids, mask = _token_batch(3, 16, seed=1)
    triggers = TriggerSet(ids, attention_mask=mask)
    got, pooling = capture(program, layer, triggers)
    want, _ = capture(model, layer, triggers, pooling=pooling)
    assert got.shape == (3, 128 if family != "gpt2" else 256)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_roberta_position_ids_computed_from_the_token_ids_stay_refused(tmp_path: Path) -> None:
    """RoBERTa gathers its position ids from a running count of the token ids: an index from
    the inputs' values (issue 18); its checkpoint and ONNX export are read instead."""
    path = tmp_path / "roberta.pt2"
    save_program(_Tokens(hf.RobertaConfig(**SMALL)),
                 tuple(torch.from_numpy(a) for a in _token_batch(2, 16, seed=0)), path)
    with pytest.raises(ModelFileError, match=r"computed from the inputs' values \(as "
                       r"aten::gather.default's 'index'\)"):
        vet_program(load_program(path))
