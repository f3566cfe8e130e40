"""Each attack does what it claims: function-preserving ones preserve the function, pruning
hits its rate, quantization stores what it says, nothing touches the host; plus the
reference-panel and registry pieces the robustness report rests on."""

from __future__ import annotations

import copy
import dataclasses
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch import nn

from freemark.derive import derive_key
from freemark.errors import InvalidInputError
from freemark.formats.pt2 import fingerprint
from freemark.scheme.activations import capture
from freemark_lab import robustness
from freemark_lab.attacks import ATTACKS, apply_attack
from freemark_lab.attacks.layers import weighted_layers
from freemark_lab.attacks.overwrite import OWNER_REGISTERED, LocalRegistry, PriorClaimError
from freemark_lab.robustness import parse_config
from freemark_lab.tasks import ImageTask, image_task

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def task() -> ImageTask:
    return image_task("digits")


@pytest.fixture(scope="module")
def host(task: ImageTask) -> nn.Module:
    return task.fit(task.new_model("same", 0), epochs=8, lr=1e-3, seed=0)


def logits(model: nn.Module, task: ImageTask) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*task.sample_inputs(64))


def key_layer(model: nn.Module, task: ImageTask) -> np.ndarray:
    return capture(model, task.layer, task.triggers(2, 0))[0]


@pytest.mark.parametrize("kind, params", [
    ("permute", {"seed": 3}),
    ("rescale", {"seed": 3}),
    ("dummy_units", {"count": 16, "seed": 3}),
    ("dummy_units", {"count": 16, "mode": "split", "seed": 3}),
    ("dummy_units", {"count": 16, "mode": "zero", "seed": 3}),
    ("combine", {"steps": [{"kind": "permute", "seed": 1}, {"kind": "rescale", "seed": 2}]}),
])
def test_obfuscation_preserves_the_function_but_moves_the_units(task, host, kind, params):
    attacked = apply_attack(kind, host, task, params)
    assert torch.allclose(logits(attacked, task), logits(host, task), atol=TOLERANCE, rtol=0)
    before, after = key_layer(host, task), key_layer(attacked, task)
    assert before.shape != after.shape or not np.allclose(before, after)


def test_rescale_is_refused_across_a_non_homogeneous_activation(task, host):
    gelu_like = dataclasses.replace(task, positive_homogeneous=False)
    with pytest.raises(ValueError, match="homogeneous"):
        apply_attack("rescale", host, gelu_like, {})


def test_no_attack_modifies_the_host(task, host):
    before = fingerprint(host)
    cheap = {"finetune": {"epochs": 1, "lr": 1e-3}, "fresh_head": {"epochs": 1, "lr": 1e-3},
             "magnitude_prune": {"rate": 0.5}, "structured_prune": {"rate": 0.5},
             "noise": {"scale": 0.5}, "distill": {"epochs": 1}, "permute": {}, "rescale": {},
             "dummy_units": {"count": 4}, "int8": {}, "fp16": {},
             "combine": {"steps": [{"kind": "int8"}]}}
    assert set(cheap) == set(ATTACKS)
    for kind, params in cheap.items():
        apply_attack(kind, host, task, params)
    assert fingerprint(host) == before


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9])
def test_magnitude_pruning_hits_its_rate(task, host, rate):
    pruned = apply_attack("magnitude_prune", host, task, {"rate": rate})
    weights = torch.cat([layer.weight.flatten() for _, layer in weighted_layers(pruned)])
    assert (weights == 0).float().mean().item() == pytest.approx(rate, abs=0.01)


def test_structured_pruning_zeroes_whole_units_except_the_head(task, host):
    pruned = apply_attack("structured_prune", host, task, {"rate": 0.5})
    for name, layer in weighted_layers(pruned):
        dead_rows = (layer.weight.flatten(1) == 0).all(dim=1)
        expected = 0 if name == task.head else int(0.5 * layer.weight.shape[0])
        assert int(dead_rows.sum()) == expected, name
        if expected:
            assert (layer.bias[dead_rows] == 0).all()


def test_int8_stores_at_most_255_levels_per_channel(task, host):
    quantized = apply_attack("int8", host, task, {})
    for _, layer in weighted_layers(quantized):
        for row in layer.weight.flatten(1):
            assert len(torch.unique(row)) <= 255
    assert (logits(quantized, task).argmax(1) == logits(host, task).argmax(1)).float().mean() > 0.95


def test_fp16_weights_are_exactly_representable_in_half(task, host):
    halved = apply_attack("fp16", host, task, {})
    for p in halved.parameters():
        assert torch.equal(p, p.half().float())
    assert not all(torch.equal(a, b) for a, b in zip(halved.parameters(), host.parameters(), strict=True))


def test_noise_is_seeded_and_relative(task, host):
    a = apply_attack("noise", host, task, {"scale": 0.1, "seed": 4})
    b = apply_attack("noise", host, task, {"scale": 0.1, "seed": 4})
    assert fingerprint(a) == fingerprint(b) != fingerprint(host)
    delta = a.fc1.weight - host.fc1.weight
    assert delta.std().item() == pytest.approx(0.1 * host.fc1.weight.std().item(), rel=0.1)


def test_last_layer_finetune_moves_only_the_head(task, host):
    tuned = apply_attack("finetune", host, task, {"epochs": 1, "lr": 1e-2, "scope": "last"})
    assert torch.equal(tuned.fc1.weight, host.fc1.weight)
    assert not torch.equal(tuned.fc2.weight, host.fc2.weight)
    everything = apply_attack("finetune", host, task, {"epochs": 1, "lr": 1e-3})
    assert not torch.equal(everything.fc1.weight, host.fc1.weight)


def test_fresh_head_reinitialises_the_head(task, host):
    fresh = apply_attack("fresh_head", host, task, {"epochs": 0, "lr": 1e-3, "seed": 2})
    again = apply_attack("fresh_head", host, task, {"epochs": 0, "lr": 1e-3, "seed": 2})
    assert not torch.equal(fresh.fc2.weight, host.fc2.weight)
    assert torch.equal(fresh.fc2.weight, again.fc2.weight)
    assert torch.equal(fresh.fc1.weight, host.fc1.weight)


def test_distillation_student_is_fresh_and_smaller_when_asked(task, host):
    small = apply_attack("distill", host, task, {"architecture": "small", "epochs": 1})
    size = sum(p.numel() for p in small.parameters())
    assert size < sum(p.numel() for p in host.parameters())
    assert key_layer(small, task).shape[1] == key_layer(host, task).shape[1]


def test_combine_equals_the_steps_in_order(task, host):
    chained = apply_attack("combine", host, task, {"steps": [
        {"kind": "magnitude_prune", "rate": 0.5}, {"kind": "permute", "seed": 9}]})
    by_hand = apply_attack("permute", apply_attack("magnitude_prune", host, task, {"rate": 0.5}),
                           task, {"seed": 9})
    assert fingerprint(chained) == fingerprint(by_hand)


def test_unknown_attacks_and_parameters_are_refused_at_config_time():
    with pytest.raises(KeyError, match="known"):
        apply_attack("melt", nn.Linear(1, 1), None, {})  # type: ignore[arg-type]
    base = {"model": {"task": "digits"}}
    with pytest.raises(InvalidInputError, match="unknown kind"):
        parse_config({**base, "attacks": [{"kind": "melt"}]})
    with pytest.raises(InvalidInputError, match="rat"):
        parse_config({**base, "attacks": [{"kind": "magnitude_prune", "params": {"rat": 0.5}}]})
    with pytest.raises(InvalidInputError, match="epoch"):
        parse_config({**base, "attacks": [{"kind": "combine", "params": {
            "steps": [{"kind": "finetune", "epoch": 1, "lr": 1e-3}]}}]})


def test_quick_keeps_marked_attacks_and_applies_overrides():
    raw = {"model": {"task": "digits", "epochs": 30}, "quick": {"model": {"epochs": 3}, "null_count": 2},
           "nulls": [{"count": 10, "epochs": 30}],
           "attacks": [{"kind": "int8", "quick": True}, {"kind": "fp16"}]}
    full, quick = parse_config(raw), parse_config(raw, quick=True)
    assert [a.kind for a in full.attacks] == ["int8", "fp16"] and full.host_epochs == 30
    assert [a.kind for a in quick.attacks] == ["int8"] and quick.host_epochs == 3
    assert quick.nulls[0].count == 2 and full.nulls[0].count == 10


# --- the reference panel ---------------------------------------------------------------

def test_panel_config_is_validated():
    base = {"model": {"task": "digits"}, "attacks": []}
    assert parse_config(base).panel is None
    config = parse_config({**base, "panel": {"count": 5, "epochs": 3}})
    assert config.panel is not None and config.panel.count == 5 and config.panel.independent
    with pytest.raises(InvalidInputError, match="count >= 3"):
        parse_config({**base, "panel": {"count": 2, "epochs": 3}})
    with pytest.raises(InvalidInputError, match=r"\[align\]"):
        parse_config({**base, "align": {"modes": ["permutation"], "count": 3, "epochs": 3}})


def test_a_null_model_that_is_also_in_the_panel_is_refused(host):
    other = copy.deepcopy(host)  # a distinct object with the same weights
    with pytest.raises(RuntimeError, match="panel member"):
        robustness._check_disjoint([(5000, host)], [other])
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    robustness._check_disjoint([(5000, host)], [other])


# --- registration order -----------------------------------------------------------------

def test_registry_is_append_only_and_earliest_matching_key_wins(task, host):
    triggers = task.triggers(5, 0)
    owner_key = derive_key(host, layer=task.layer, triggers=triggers, owner="owner")
    thief_key = derive_key(host, layer=task.layer, triggers=task.triggers(5, 1), owner="thief")
    registry = LocalRegistry()
    registry.register("owner", host, owner_key, at=OWNER_REGISTERED)
    with pytest.raises(ValueError, match="append-only"):
        registry.register("thief", host, thief_key, at=OWNER_REGISTERED - timedelta(days=1))
    with pytest.raises(PriorClaimError, match="owner"):
        registry.register("thief", host, thief_key, at=OWNER_REGISTERED + timedelta(days=1))
    registry.register("thief", host, thief_key, at=OWNER_REGISTERED + timedelta(days=1),
                      check_prior=False)
    claims = registry.claims(host)
    assert [c.claimant for c in claims] == ["owner", "thief"]
