"""What a verdict reads: the suspect on its triggers, and on the alignment probes only where
the aligned test runs (a panel of at least MIN_PANEL and a key with a probe profile); the
verdict is the same either way."""

from __future__ import annotations

import numpy as np
import pytest

import scheme_models as sm
from freemark import derive_key, extract, reading
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark.verdict.aligned import MIN_PANEL


@pytest.fixture(scope="module")
def bundle() -> KeyBundle:
    ds = sm.task("digits").dataset
    triggers = select_triggers(ds.x_train, ds.y_train, per_class=10, seed=0)
    return derive_key(sm.host("digits"), layer="act", triggers=triggers, owner="alice")


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many inputs each forward pass of `freemark.reading` reads."""
    seen: list[int] = []
    real = reading.capture

    def capture(model, layer, triggers: TriggerSet, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(triggers.inputs))
        return real(model, layer, triggers, **kwargs)

    monkeypatch.setattr(reading, "capture", capture)
    return seen


def test_without_a_panel_the_suspect_is_read_on_its_triggers_alone(
        bundle: KeyBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bundle.probes > 0 and not reading.aligns(bundle, ())
    seen = _counting(monkeypatch)
    verdict = extract(sm.finetuned("digits"), bundle)
    assert seen == [len(bundle.triggers)]
    assert verdict.is_match and len(verdict.tests) == 1


def test_with_a_panel_the_suspect_is_read_on_the_probes_too(
        bundle: KeyBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    references = [sm.independent("digits", seed) for seed in range(2, 2 + MIN_PANEL)]
    assert reading.aligns(bundle, references)
    seen = _counting(monkeypatch)
    verdict = extract(sm.finetuned("digits"), bundle, references=references)
    assert seen == [len(bundle.triggers) + bundle.probes] * (MIN_PANEL + 1)
    assert [t.name for t in verdict.tests] == ["plain", "aligned"]


def test_a_reading_splits_into_triggers_and_probes(bundle: KeyBundle) -> None:
    model = sm.host("digits")
    alone, none = reading.read_layer(model, bundle, probes=False)
    both, probes = reading.read_layer(model, bundle, probes=True)
    assert none is None and probes is not None and len(probes) == bundle.probes
    np.testing.assert_allclose(alone, both, rtol=1e-5, atol=1e-6)
    assert reading.probe_count(bundle, probes=False) == 0
