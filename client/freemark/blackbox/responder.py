"""What answers an output key's queries: a `Responder`, and how its answers are read.

A Responder is anything that maps a batch of inputs to labels or scores: a local model file
(`freemark.blackbox.local.LocalResponder`), or a prediction endpoint behind the Open Inference
Protocol. Its answers are untrusted: `read_answers` checks their shape, dtype and range before
any statistic sees them, and refuses with a message that says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from freemark.errors import InvalidInputError

__all__ = ["Answers", "Responder", "read_answers"]


@runtime_checkable
class Responder(Protocol):
    """Answers a batch of inputs (the key's dtype and shape, batch first): an (n,) integer
    array of top-1 labels, or an (n, classes) float array of scores (logits or
    probabilities: only their order is read)."""

    def answer(self, inputs: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Answers:
    """A Responder's answers, checked: top-1 labels always, scores where it gave them."""

    labels: np.ndarray  # (n,) int64
    scores: np.ndarray | None  # (n, classes) float64, or None for a labels-only responder

    @property
    def has_scores(self) -> bool:
        """Whether the score and ranking statistics can be read."""
        return self.scores is not None


def read_answers(raw: np.ndarray, n: int, n_classes: int) -> Answers:
    """Check a Responder's answer to `n` inputs of a `n_classes`-way model and read it."""
    answer = np.asarray(raw)
    if answer.ndim == 1:
        if answer.shape != (n,) or not np.issubdtype(answer.dtype, np.integer):
            raise InvalidInputError(f"the responder returned {answer.shape} {answer.dtype} "
                                    f"labels for {n} inputs; expected ({n},) integers")
        labels = answer.astype(np.int64)
        if np.any(labels < 0) or np.any(labels >= n_classes):
            raise InvalidInputError(f"the responder returned labels outside 0..{n_classes - 1}")
        return Answers(labels=labels, scores=None)
    if answer.shape != (n, n_classes) or not np.issubdtype(answer.dtype, np.floating):
        raise InvalidInputError(f"the responder returned {answer.shape} {answer.dtype} scores "
                                f"for {n} inputs; expected ({n}, {n_classes}) floats")
    scores = answer.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError("the responder returned scores that are not finite")
    return Answers(labels=scores.argmax(axis=1), scores=scores)
