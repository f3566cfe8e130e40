"""Deriving an output key on real trained models: the host and a fine-tuned copy answer as the
key says, held-out independents do not; the host is never changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import blackbox_models as bm
from freemark.blackbox.judge import check_host_answers, extract_outputs
from freemark.blackbox.local import LocalResponder
from freemark.blackbox.queries import architecture, derive_output_key, panel_folds
from freemark.errors import InvalidInputError
from freemark.formats.pt2 import fingerprint
from freemark.verdict.decision import DEFAULT_ALPHA


def test_the_key_holds_what_a_verifier_needs() -> None:
    key = bm.output_key()
    assert key.queries.shape == (bm.QUERIES * bm.SETS, 1, 8, 8)
    assert key.queries.dtype == bm.data().x_train.dtype  # the host's own input domain
    assert key.n_sets == bm.SETS and len(key.ranking_inputs) == bm.QUERIES * bm.SETS
    assert key.host_fingerprint == fingerprint(bm.host())
    assert key.panel == [fingerprint(m) for m in bm.panel()]
    # Within ε of an owner image, on the 256-level pixel grid.
    assert np.allclose(key.queries * 255, np.round(key.queries * 255), atol=1e-4)
    assert key.queries.min() >= 0 and key.queries.max() <= 1
    # Both folds shaped by both architectures.
    folds = panel_folds(bm.panel())
    for fold in (0, 1):
        members = [m for m, f in zip(bm.panel(), folds, strict=True) if f == fold]
        assert len({architecture(m) for m in members}) == 2
    # The host answers every query with its bit's target class.
    check_host_answers(key, LocalResponder(bm.host(), labels_only=True).answer(key.queries))


@pytest.mark.parametrize("labels_only", [True, False])
def test_host_and_a_fine_tuned_copy_match_independents_do_not(labels_only: bool) -> None:
    key = bm.output_key()
    for set_id in range(key.n_sets):
        for suspect in (bm.host(), bm.finetuned()):
            verdict = extract_outputs(LocalResponder(suspect, labels_only=labels_only), key,
                                      set_id=set_id)
            assert verdict.outcome == "match", verdict.p_value_method
            assert verdict.p_value <= DEFAULT_ALPHA
        for independent in bm.independents():
            verdict = extract_outputs(LocalResponder(independent, labels_only=labels_only), key,
                                      set_id=set_id)
            assert verdict.outcome == "no_match" and verdict.p_value >= 1e-3
    names = [t.name for t in extract_outputs(LocalResponder(bm.host()), key).tests]
    assert names == ["labels", "scores", "ranking"]


def test_a_host_that_answers_otherwise_is_refused() -> None:
    key = bm.output_key()
    labels = LocalResponder(bm.independents()[0], labels_only=True).answer(key.queries)
    with pytest.raises(InvalidInputError, match="does not answer"):
        check_host_answers(key, labels)


def test_the_panel_must_be_eight_models_of_two_architectures() -> None:
    d = bm.data()
    with pytest.raises(InvalidInputError, match="at least 8 reference models"):
        derive_output_key(bm.host(), d.x_train, d.y_train, bm.panel()[:7], owner="a")
    one_architecture = [bm.panel()[i] for i in (0, 2, 4, 6)] * 2  # eight, all full-width
    with pytest.raises(InvalidInputError, match="share one architecture"):
        derive_output_key(bm.host(), d.x_train, d.y_train, one_architecture, owner="a")


class _Normalised(nn.Module):
    """A program that takes normalised tensors, as most vision models do: `model` on
    `z * std + mean`."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z * self.std + self.mean)


def test_a_host_that_takes_normalised_inputs_gets_queries_in_its_own_domain() -> None:
    """Owner data outside [0, 1] and [0, 255] (here normalised to zero mean and unit spread,
    so it runs negative) keeps its own range: every query stays inside it, on 256 levels
    across it, within ε of an owner image, and the host answers each as the key says."""
    x, y = bm.owner_data()
    mean, std = float(x.mean()), float(x.std())
    z = ((x - mean) / std).astype(np.float32)
    wrap = lambda m: _Normalised(m, mean, std)
    key = derive_output_key(wrap(bm.host()), z, y, [wrap(m) for m in bm.panel()],
                            owner="alice", n_queries=16, n_sets=1, recipes=bm.RECIPES)
    low, high = float(z.min()), float(z.max())
    assert low < 0 and key.queries.min() >= low - 1e-5 and key.queries.max() <= high + 1e-5
    steps = (key.queries - low) * 255 / (high - low)
    assert np.allclose(steps, np.round(steps), atol=1e-3)
    check_host_answers(key, LocalResponder(wrap(bm.host()), labels_only=True).answer(
        key.queries))


def test_too_few_queries_in_all_are_refused_before_any_work() -> None:
    with pytest.raises(InvalidInputError, match="16 queries in all"):
        derive_output_key(bm.host(), *bm.owner_data(), bm.panel(), owner="alice", n_queries=8,
                          n_sets=1, recipes=bm.RECIPES)
