"""The scheme on real models trained here: fidelity, robustness, uniqueness (scheme issue).

Hosts: a CNN on scikit-learn's digits (128-unit key layer) and a CNN on the real MNIST
subset (256-unit key layer). Stolen copies must be detected at calibrated p ≤ 1e-9 while
keeping accuracy within 5 points; independently trained models must not be, p ≥ 1e-3.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
import pytest
from torch import nn

import scheme_models as sm
from freemark import derive_key, extract
from freemark.cli.display import print_rows
from freemark.errors import UniquenessError
from freemark.scheme.triggers import select_triggers
from freemark_lab.train import accuracy

ALPHA = 1e-9
NULL_FLOOR = 1e-3
ACCURACY_POINTS = 0.05
N_INDEPENDENT = 5


def _weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=["digits", "mnist"])
def task_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_watermark_survives_theft_and_spares_independent_models(task_name: str) -> None:
    task = sm.task(task_name)
    ds = task.dataset
    host = sm.host(task_name)
    triggers = select_triggers(ds.x_train, ds.y_train, per_class=10, seed=0)

    before = _weights_hash(host)
    bundle = derive_key(host, layer="act", triggers=triggers, owner="alice@example.com")
    assert _weights_hash(host) == before, "derivation changed a weight"

    host_acc = accuracy(host, ds.x_test, ds.y_test)
    stolen: dict[str, Callable[[str], nn.Module]] = {
        "finetune": sm.finetuned, "prune50": sm.pruned, "fp16": sm.fp16, "int8": sm.int8,
    }
    rows: list[list[object]] = []
    host_verdict = extract(host, bundle)
    rows.append(["host", host_acc, host_verdict.ber, host_verdict.log10_p_value,
                 host_verdict.log10_p_value_binomial, host_verdict.is_match])
    assert host_verdict.ber == 0.0 and host_verdict.is_match

    failures: list[str] = []
    for name, make in stolen.items():
        model = make(task_name)
        acc = accuracy(model, ds.x_test, ds.y_test)
        verdict = extract(model, bundle)
        rows.append([name, acc, verdict.ber, verdict.log10_p_value,
                     verdict.log10_p_value_binomial, verdict.is_match])
        if not (verdict.p_value <= ALPHA and verdict.is_match):
            failures.append(f"{name} not detected: p={verdict.p_value:.2e}")
        if acc < host_acc - ACCURACY_POINTS:
            failures.append(f"{name} lost accuracy: {acc:.3f} vs {host_acc:.3f}")

    for seed in range(N_INDEPENDENT):
        model = sm.independent(task_name, seed)
        verdict = extract(model, bundle)
        rows.append([f"independent-{seed}", accuracy(model, ds.x_test, ds.y_test), verdict.ber,
                     verdict.log10_p_value, verdict.log10_p_value_binomial, verdict.is_match])
        if verdict.p_value < NULL_FLOOR or verdict.is_match:
            failures.append(f"independent model {seed} flagged: p={verdict.p_value:.2e}")

    print(f"\n{task_name}: layer act, {bundle.units} units, N={bundle.n_bits}, alpha={ALPHA}")
    print_rows(["model", "test acc", "BER", "log10 p (calibrated)", "log10 p (binomial)", "match"], rows)
    assert not failures, failures


def test_uniqueness_guard_refuses_an_uncentred_key() -> None:
    """Without centring every post-ReLU model shares the all-positive direction: refused."""
    task = sm.task("digits")
    triggers = select_triggers(task.dataset.x_train, task.dataset.y_train, per_class=10, seed=0)
    with pytest.raises(UniquenessError, match="random relabelling of the host's units"):
        derive_key(sm.host("digits"), layer="act", triggers=triggers, owner="alice", centred=False)


def test_uniqueness_guard_refuses_a_key_a_reference_decodes() -> None:
    """A 'reference' that is really a copy of the host is caught by the same calibrated test."""
    task = sm.task("digits")
    triggers = select_triggers(task.dataset.x_train, task.dataset.y_train, per_class=10, seed=0)
    with pytest.raises(UniquenessError, match="reference model #0 decodes the watermark"):
        derive_key(sm.host("digits"), layer="act", triggers=triggers, owner="alice",
                   references=[sm.fp16("digits")])


def test_reference_models_become_negatives_and_keep_the_host_exact() -> None:
    task = sm.task("digits")
    triggers = select_triggers(task.dataset.x_train, task.dataset.y_train, per_class=10, seed=0)
    refs = [sm.independent("digits", s) for s in range(2)]
    bundle = derive_key(sm.host("digits"), layer="act", triggers=triggers, owner="alice",
                        references=refs)
    assert extract(sm.host("digits"), bundle).ber == 0.0
    for ref in refs:
        assert extract(ref, bundle).p_value >= NULL_FLOOR
    assert math.isfinite(bundle.margins.min) and bundle.margins.min >= bundle.margins.target
    assert np.isfinite(bundle.key).all()
