"""The lab's pretrained EfficientNet-Lite0 is the real ImageNet model on real photos: the cat
photo comes out as a cat, and the key layer reads 1,280 spatially pooled units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freemark.scheme.activations import capture
from freemark.v1 import bundle_pb2
from freemark_lab import imagenet


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return imagenet.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def triggers():
    return imagenet.photo_triggers()


def test_photos_are_sixteen_normalised_224_images(triggers):
    assert triggers.inputs.shape == (16, 3, 224, 224) and triggers.inputs.dtype == np.float32
    assert abs(float(triggers.inputs.mean())) < 1.0  # ImageNet-normalised, not raw [0, 1]
    assert len({row.tobytes() for row in triggers.inputs}) == 16  # sixteen distinct photos


def test_pretrained_weights_see_the_cat_as_a_cat(model, triggers):
    with torch.no_grad():
        logits = model(torch.from_numpy(triggers.inputs))
    top = logits.argmax(dim=1).tolist()
    assert top[imagenet.PHOTOS.index("chelsea")] in imagenet.CAT_CLASSES
    assert top[imagenet.PHOTOS.index("coffee")] == 967  # espresso
    assert sum(label in imagenet.CAT_CLASSES for label in top) == 1  # and nothing else is a cat


def test_key_layer_is_the_head_features(model, triggers):
    activations, pooling = capture(model, imagenet.KEY_LAYER, triggers)
    assert activations.shape == (16, 1280)
    assert pooling == bundle_pb2.POOLING_SPATIAL_MEAN
