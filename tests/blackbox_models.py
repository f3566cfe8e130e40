"""Real models for the output-key tests, trained here on scikit-learn's digits and cached under
`.cache/` by `build_cache` (every pytest worker and later run reuses them; the key is kept
there as the product keeps it, in its passphrase-encrypted file).

As in the world an output key is made for, nobody shares training images: the owner's host
learns from the first 600 training images (the owner's data, which the key is derived from),
the eight panel members (two architectures: the digits CNN and its quarter-width student)
and the held-out independents from the other 598, and the thief fine-tunes the host on the
test split. (Models trained on one and the same 1,198 images are near-copies of each other:
there, held-out panel members answer a third of the queries as the host does.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from torch import nn

import freemark.blackbox
from build_cache import CACHE, cached, cached_module, lab_training_code, source_digest
from freemark.blackbox.key import OutputKey, load_output_key, save_output_key
from freemark.blackbox.queries import derive_output_key
from freemark.blackbox.surrogates import Recipe
from freemark_lab.data import Dataset, digits
from freemark_lab.models import DigitsCNN, digits_student
from freemark_lab.train import train, trained

QUERIES = 48
SETS = 2
OWNER = 600
# One surrogate keeps the tests fast; the product's default is four (surrogates.DEFAULT_RECIPES).
RECIPES = (Recipe("finetune", epochs=10, lr=3e-3, seed=4),)
BLACKBOX = Path(freemark.blackbox.__file__).parent
KEY_PASSPHRASE = b"freemark test fixtures"


@cache
def data() -> Dataset:
    return digits()


def owner_data() -> tuple[np.ndarray, np.ndarray]:
    d = data()
    return d.x_train[:OWNER], d.y_train[:OWNER]


def _architecture(seed: int) -> Callable[[], nn.Module]:
    return DigitsCNN if seed % 2 == 0 else digits_student


def _cached(label: str, parts: dict[str, object], make: Callable[[], nn.Module],
            architecture: Callable[[], nn.Module]) -> nn.Module:
    return cached_module(f"blackbox-{label}", {**parts, "owner": OWNER,
                                               "code": lab_training_code()}, make, architecture)


@cache
def model(seed: int) -> nn.Module:
    """An independently trained digits model on the others' images; odd seeds are the
    quarter-width architecture."""
    d = data()
    return _cached(f"seed{seed}", {"seed": seed, "epochs": 30}, lambda: trained(
        _architecture(seed), d.x_train[OWNER:], d.y_train[OWNER:],  # type: ignore[arg-type]
        epochs=30, seed=seed), _architecture(seed))


@cache
def host() -> nn.Module:
    return _cached("host", {"seed": 1000, "epochs": 30}, lambda: trained(
        DigitsCNN, *owner_data(), epochs=30, seed=1000), DigitsCNN)


def panel() -> list[nn.Module]:
    return [model(10 + i) for i in range(8)]


def independents() -> list[nn.Module]:
    return [model(50 + i) for i in range(2)]


@cache
def finetuned() -> nn.Module:
    d = data()
    return _cached("finetuned", {"of": "host", "seed": 5, "epochs": 10}, lambda: train(
        copy.deepcopy(host()), d.x_test, d.y_test, epochs=10, lr=1e-3, seed=5), DigitsCNN)


@cache
def output_key() -> OutputKey:
    """The owner's key, derived once between all workers (its derivation code is part of
    what names the cached file)."""
    def build(folder: Path) -> None:
        key = derive_output_key(host(), *owner_data(), panel(), owner="alice@example.com",
                                n_queries=QUERIES, n_sets=SETS, recipes=RECIPES)
        save_output_key(folder / "key.fmk", key, KEY_PASSPHRASE)

    parts = {"host": "host", "panel": [10 + i for i in range(8)], "queries": QUERIES,
             "sets": SETS, "recipes": [repr(r) for r in RECIPES],
             "code": [lab_training_code(), source_digest(*sorted(BLACKBOX.glob("*.py")))]}
    return load_output_key(cached(CACHE / "test-models", "blackbox-output-key", parts, build)
                           / "key.fmk", KEY_PASSPHRASE)


def owner_npz_arrays() -> dict[str, np.ndarray]:
    x, y = owner_data()
    return {"x": x, "y": y}
