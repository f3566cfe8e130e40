"""The black-box experiment's students are trained to convergence (issue 19): `converged` stops
when the held-out accuracy has not improved for `patience` epochs, keeps the best epoch's
weights, and reports what the docs quote. A digits student trained here, in seconds."""

from __future__ import annotations

import torch
from torch import nn

from freemark_lab.blackbox import accuracy, converged
from freemark_lab.data import digits
from freemark_lab.models import digits_student


def test_a_student_stops_when_held_out_accuracy_stops_improving_and_keeps_its_best() -> None:
    d = digits()
    held = (d.x_test[:300], d.y_test[:300])
    torch.manual_seed(0)
    model, notes = converged(digits_student(), d.x_train, torch.from_numpy(d.y_train),
                             nn.functional.cross_entropy, held, cap=40, patience=2, seed=1)
    run, best = int(notes["epochs_run"]), int(notes["best_epoch"])
    # Stopped by the rule, not the cap: two epochs without improvement after the best.
    assert run == best + 2 < 40, notes
    # The weights returned are the best epoch's, not the last one's.
    assert f"{accuracy(model, *held):.4f}" == notes["held_out_accuracy"]
    assert float(notes["held_out_accuracy"]) > 0.8
