"""Deriving an output key on real trained models: the host and a fine-tuned copy answer as the
key says, held-out independents do not; the host is never changed."""

from __future__ import annotations

import numpy as np
import pytest

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
