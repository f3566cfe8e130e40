"""A responder's answers are untrusted: shape, dtype and range are checked before any statistic."""

from __future__ import annotations

import numpy as np
import pytest

from freemark.blackbox.responder import read_answers
from freemark.errors import InvalidInputError


def test_labels_and_scores_are_read() -> None:
    labels = read_answers(np.array([3, 1, 0]), 3, 10)
    assert labels.labels.tolist() == [3, 1, 0] and not labels.has_scores
    scores = read_answers(np.eye(3, 10, dtype=np.float32), 3, 10)
    assert scores.labels.tolist() == [0, 1, 2] and scores.has_scores


@pytest.mark.parametrize(("raw", "why"), [
    (np.array([1, 2]), "for 3 inputs"),
    (np.array([1.0, 2.0, 3.0]), "integers"),
    (np.array([1, 2, 10]), "outside 0..9"),
    (np.zeros((3, 9), dtype=np.float32), r"\(3, 10\) floats"),
    (np.full((3, 10), np.nan), "not finite"),
    (np.zeros((3, 10), dtype=np.int64), "floats"),
])
def test_malformed_answers_are_refused(raw: np.ndarray, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        read_answers(raw, 3, 10)
