"""A Responder over a model in this process: the owner's own file, or any trusted module.

It answers as a prediction API would: log-probabilities (a softmax in float32 underflows to
ties far down the ranking, log-softmax keeps the order), or only the top-1 label
(`labels_only`). Only for models you trust: a key server runs uploads in its sandbox.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from freemark.formats.local import load_model
from freemark.scheme.activations import output_scores

__all__ = ["LocalResponder"]

BATCH = 512


class LocalResponder:
    """`freemark.blackbox.responder.Responder` over an in-process model."""

    def __init__(self, model: nn.Module | torch.export.ExportedProgram, *,
                 labels_only: bool = False) -> None:
        self.model = model
        self.labels_only = labels_only

    @classmethod
    def open(cls, path: str | Path, *, labels_only: bool = False) -> LocalResponder:
        """A responder over a model file (any format `freemark.formats.local` loads)."""
        return cls(load_model(path), labels_only=labels_only)

    def answer(self, inputs: np.ndarray) -> np.ndarray:
        """Labels (n,) int64, or log-probabilities (n, classes) float32: the one reading of
        a model's outputs (`freemark.scheme.activations.output_scores`), the same numbers a
        key server's sandbox reads from an uploaded file."""
        scores = output_scores(self.model, inputs, batch_size=BATCH)
        if self.labels_only:
            return scores.argmax(axis=1).astype(np.int64)
        return scores
