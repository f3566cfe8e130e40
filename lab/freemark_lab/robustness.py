"""The robustness runner: one TOML file fixes a run; the result is a `Report`.

A run trains the host, derives its key, trains the reference panel (`[panel]`: independent
models of the host's architecture, or other fine-tunes of the same public checkpoint) and
the held-out null models (`[[nulls]]`), applies every attack in the config to a copy of
the host, and judges each result with the library's own verdict
(`freemark.extract.judge_activations`): the plain test, the aligned test calibrated on the
panel (`freemark.verdict.aligned`) and their combination (`freemark.verdict.decision.decide`). It also
plays the ambiguity attack.

The panel is disjoint from the nulls by construction (its own seeds) and by check (no
null model's weight fingerprint is a panel member's): the false-positive rates the report
claims are measured on models the test was not calibrated on.

Status of an attacked copy:
- "detected": the combined verdict is a match (combined p ≤ α);
- "destroys the model": not detected, but test accuracy fell by more than the config's
  bound, so the thief gained nothing worth a claim and it is not counted as a removal;
- "removed": not detected and the model still works. These are the scheme's real failures.

Reproducibility: models, data, attacks and the watermark nonce are all seeded from the
config. The key's random anchor is drawn by `derive_key` from the OS CSPRNG (it is a
secret), so p-values move slightly between runs; decisions should not.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from freemark.derive import DEFAULT_BITS, derive_key
from freemark.errors import FreemarkError, InvalidInputError
from freemark.extract import judge_activations
from freemark.formats.pt2 import fingerprint
from freemark.panel import Reference, count_for, measure_reference
from freemark.reading import read_layer
from freemark.records.types import VerdictTest
from freemark.scheme.bundle import KeyBundle
from freemark.verdict.aligned import MIN_PANEL
from freemark.verdict.decision import DEFAULT_ALPHA, DEFAULT_PERMUTATIONS, Verdict
from freemark_lab.attacks import ATTACKS, FUNCTION_PRESERVING, apply_attack
from freemark_lab.attacks.overwrite import OverwriteResult, overwrite
from freemark_lab.tasks import Task, image_task

DEFAULT_DESTROY_BOUND = 0.05
NULL_SEED_BASE = 1000
REFERENCE_SEED_BASE = 5000
ATTACKER_TRIGGER_SEED = 7


@dataclass(frozen=True)
class AttackSpec:
    """One `[[attacks]]` entry: a display name, the attack's kind and its parameters."""

    name: str
    kind: str
    params: Mapping[str, Any]
    quick: bool = False


@dataclass(frozen=True)
class NullGroup:
    """One `[[nulls]]` entry: `count` models trained from `variant` with their own seeds."""

    label: str
    variant: str
    count: int
    epochs: int
    lr: float
    independent: bool = True


@dataclass(frozen=True)
class Config:
    """A parsed, validated run configuration (see freemark_lab/configs/*.toml)."""

    name: str
    raw: Mapping[str, Any]
    quick: bool
    seed: int
    threads: int
    alpha: float
    destroy_bound: float
    n_permutations: int
    task: str
    task_options: Mapping[str, Any]
    host_variant: str
    host_epochs: int
    host_lr: float
    n_bits: int
    triggers_per_class: int
    owner: str
    specificity_variant: str | None
    nulls: tuple[NullGroup, ...]
    panel: NullGroup | None  # the reference panel; None: plain test only
    overwrite_params: Mapping[str, Any] | None
    attacks: tuple[AttackSpec, ...]


@dataclass(frozen=True)
class AttackRow:
    """One attacked copy of the host and what each extraction says about it."""

    attack: str
    kind: str
    params: Mapping[str, Any]
    accuracy_before: float
    accuracy_after: float
    verdict: Verdict | None  # the combined verdict; None: another width and no panel to align
    status: str
    seconds: float
    function_preserving: bool
    plain_alone: Verdict | None = None  # the plain test without the panel (what a key alone gives)
    note: str = ""

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_before - self.accuracy_after

    def test(self, name: str) -> VerdictTest | None:
        """The verdict's "plain" or "aligned" test, None where it did not run."""
        return find_test(self.verdict, name)


@dataclass(frozen=True)
class NullRow:
    """One null-panel model: an independent (or related) model the key must not (or may) match."""

    label: str
    seed: int
    independent: bool
    accuracy: float
    verdict: Verdict  # the combined verdict
    plain_alone: Verdict | None = None

    def test(self, name: str) -> VerdictTest | None:
        """The verdict's "plain" or "aligned" test, None where it did not run."""
        return find_test(self.verdict, name)


def find_test(verdict: Verdict | None, name: str) -> VerdictTest | None:
    """The test called `name` in a verdict's `tests`, or None."""
    if verdict is None:
        return None
    return next((t for t in verdict.tests if t.name == name), None)


@dataclass(frozen=True)
class Report:
    """Everything a run measured; rendered by `freemark_lab.report`."""

    name: str
    task: str
    layer: str
    units: int
    n_bits: int
    alpha: float
    destroy_bound: float
    quick: bool
    host_accuracy: float
    host_verdict: Verdict
    host_plain_alone: Verdict | None
    rows: tuple[AttackRow, ...]
    nulls: tuple[NullRow, ...]
    panel_label: str  # "" without a panel
    panel_seeds: tuple[int, ...]
    panel_counts: tuple[int, ...]  # each panel member's matched host units (the aligned null)
    host_units: int  # live canonical host units on the probes (the aligned test's trials)
    overwrite: OverwriteResult | None
    notes: tuple[str, ...]
    seconds: float
    threads: int
    config: Mapping[str, Any]

    @property
    def false_positives(self) -> list[NullRow]:
        """Independent held-out models the combined verdict wrongly matched."""
        return [n for n in self.nulls if n.independent and n.verdict.is_match]


def _table(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InvalidInputError(f"config: [{key}] must be a table")
    return dict(value)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _null_group(entry: Mapping[str, Any], where: str) -> NullGroup:
    try:
        return NullGroup(label=str(entry.get("label", where)), variant=str(entry.get("variant", "same")),
                         count=int(entry["count"]), epochs=int(entry["epochs"]),
                         lr=float(entry.get("lr", 1e-3)), independent=bool(entry.get("independent", True)))
    except KeyError as exc:
        raise InvalidInputError(f"config: {where} needs {exc.args[0]!r}") from exc


def _check_params(spec: AttackSpec, index: int) -> None:
    """Fail at load time, not twenty minutes into a run, on a misspelt attack parameter."""
    steps = spec.params.get("steps") if spec.kind == "combine" else None
    for kind, params in [(str(s.get("kind")), {k: v for k, v in s.items() if k != "kind"})
                         for s in steps or []] or [(spec.kind, dict(spec.params))]:
        if kind not in ATTACKS:
            raise InvalidInputError(f"config: [[attacks]] #{index} ({spec.name}) has unknown step {kind!r}")
        try:
            inspect.signature(ATTACKS[kind]).bind(None, None, **params)
        except TypeError as exc:
            raise InvalidInputError(f"config: [[attacks]] #{index} ({spec.name}): {exc}") from exc


def parse_config(raw: Mapping[str, Any], *, quick: bool = False) -> Config:
    """Validate a config dict; `quick` applies its `[quick]` overrides and keeps `quick` attacks.

    `[quick]` holds tables merged over the main ones (e.g. `[quick.model] epochs = 10`) and
    `null_count`, a cap on every null group's size.
    """
    data = dict(raw)
    quick_overrides = _table(data, "quick")
    if quick:
        data = _merge(data, {k: v for k, v in quick_overrides.items() if isinstance(v, dict)})
    run, model, key = _table(data, "run"), _table(data, "model"), _table(data, "key")
    panel_table, over = _table(data, "panel"), _table(data, "overwrite")
    if "align" in data:
        raise InvalidInputError("config: [align] (the lab's old aligned extraction) is gone; the "
                                "library's aligned test is calibrated on [panel] (count, variant, "
                                "epochs, lr)")
    if "task" not in model:
        raise InvalidInputError("config: [model] needs task = \"digits\" | \"mnist\" | \"minilm\"")
    cap = int(quick_overrides.get("null_count", 10**9)) if quick else 10**9
    nulls = []
    for i, entry in enumerate(data.get("nulls", [])):
        group = _null_group(entry, f"[[nulls]] #{i}")
        nulls.append(NullGroup(group.label, group.variant, min(group.count, cap), group.epochs,
                               group.lr, group.independent))
    panel = None
    if panel_table:
        panel = _null_group({"label": "independently trained", **panel_table}, "[panel]")
        if panel.count < MIN_PANEL:
            raise InvalidInputError(f"config: [panel] needs count >= {MIN_PANEL} (the aligned "
                                    f"test's minimum panel)")
    attacks = []
    for i, entry in enumerate(data.get("attacks", [])):
        kind = entry.get("kind")
        if kind not in ATTACKS:
            raise InvalidInputError(f"config: [[attacks]] #{i} has unknown kind {kind!r}; "
                                    f"known: {', '.join(sorted(ATTACKS))}")
        spec = AttackSpec(name=str(entry.get("name", kind)), kind=kind,
                          params=dict(entry.get("params", {})), quick=bool(entry.get("quick", False)))
        _check_params(spec, i)
        if spec.quick or not quick:
            attacks.append(spec)
    task_options = {k: v for k, v in model.items()
                    if k not in {"task", "variant", "epochs", "lr"}}
    return Config(
        name=str(run.get("name", model["task"])), raw=raw, quick=quick, seed=int(run.get("seed", 0)),
        threads=int(run.get("threads", 2)), alpha=float(run.get("alpha", DEFAULT_ALPHA)),
        destroy_bound=float(run.get("destroy_bound", DEFAULT_DESTROY_BOUND)),
        n_permutations=int(run.get("n_permutations", DEFAULT_PERMUTATIONS)),
        task=str(model["task"]), task_options=task_options,
        host_variant=str(model.get("variant", "same")), host_epochs=int(model.get("epochs", 30)),
        host_lr=float(model.get("lr", 1e-3)), n_bits=int(key.get("n_bits", DEFAULT_BITS)),
        triggers_per_class=int(key.get("triggers_per_class", 10)),
        owner=str(key.get("owner", "owner@lab.example")),
        specificity_variant=key.get("specificity_reference"), nulls=tuple(nulls), panel=panel,
        overwrite_params=over if over.get("enabled", False) else None,
        attacks=tuple(attacks),
    )


def load_config(path: str | Path, *, quick: bool = False) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read the config ({exc})") from exc
    return parse_config(raw, quick=quick)


def build_task(config: Config) -> Task:
    """The task the config names, with its options ([model] keys other than task/variant/epochs/lr)."""
    options = dict(config.task_options)
    if config.task == "minilm":
        from freemark_lab.transformer import text_task  # transformers is heavy: import on demand

        return text_task(seed=config.seed, **options)
    return image_task(config.task, seed=config.seed, **options)


def _nonce(config: Config) -> bytes:
    """A watermark nonce fixed by the config, so the bits b are reproducible."""
    return hashlib.sha256(f"freemark/lab/{config.name}/{config.seed}".encode()).digest()


class Judge:
    """The library's verdict for one key, with the panel measured once (not once per suspect)."""

    def __init__(self, config: Config, bundle: KeyBundle, panel: list[nn.Module]) -> None:
        self.config, self.bundle = config, bundle
        self.panel: list[Reference] = [measure_reference(m, bundle) for m in panel]

    def judge(self, model: nn.Module) -> tuple[Verdict | None, Verdict | None]:
        """(the verdict the report decides on: with the panel where there is one, the plain
        verdict without the panel); None where no verdict can be given (the key layer
        changed width and there is no panel to align it)."""
        triggers, probes = read_layer(model, self.bundle, probes=True)
        alone = self._judge(triggers, probes, [])
        return (self._judge(triggers, probes, self.panel) if self.panel else alone), alone

    def _judge(self, triggers: np.ndarray, probes: np.ndarray | None,
               panel: list[Reference]) -> Verdict | None:
        try:
            return judge_activations(triggers, self.bundle, alpha=self.config.alpha,
                                     probe_activations=probes, panel=panel,
                                     n_permutations=self.config.n_permutations)
        except InvalidInputError:
            return None

    def panel_counts(self) -> tuple[int, ...]:
        """Each panel member's matched host units: the aligned test's null sample."""
        assert self.bundle.probe_profile is not None
        return tuple(count_for(r, self.bundle) for r in self.panel)


def status(verdict: Verdict | None, accuracy_drop: float, bound: float) -> str:
    """"detected", "destroys the model" or "removed" (see the module docstring)."""
    if verdict is not None and verdict.is_match:
        return "detected"
    return "destroys the model" if accuracy_drop > bound else "removed"


def _train_group(task: Task, group: NullGroup, seed_base: int, bar: tqdm) -> list[tuple[int, nn.Module]]:
    models = []
    for i in range(group.count):
        seed = seed_base + i
        model = task.new_model(group.variant, seed)
        if group.epochs > 0:
            task.fit(model, epochs=group.epochs, lr=group.lr, seed=seed)
        models.append((seed, model))
        bar.update(1)
    return models


def run(config: Config, *, progress: bool = True) -> Report:
    """Execute a run end to end and return its report (nothing is written here).

    torch's thread count is set from the config for the run and restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, *, progress: bool) -> Report:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    task = build_task(config)
    n_models = 1 + sum(g.count for g in config.nulls) + (config.panel.count if config.panel else 0)
    with tqdm(total=n_models, desc=f"{config.name}: training", unit="model", disable=not progress) as bar:
        host = task.fit(task.new_model(config.host_variant, config.seed), epochs=config.host_epochs,
                        lr=config.host_lr, seed=config.seed)
        bar.update(1)
        groups = [(g, _train_group(task, g, NULL_SEED_BASE + 100 * i, bar))
                  for i, g in enumerate(config.nulls)]
        panel = _train_group(task, config.panel, REFERENCE_SEED_BASE, bar) if config.panel else []
    _check_disjoint(panel, [m for _, members in groups for _, m in members])
    host_accuracy = task.evaluate(host)
    bundle = derive_key(host, layer=task.layer, triggers=task.triggers(config.triggers_per_class, config.seed),
                        owner=config.owner, n_bits=config.n_bits, nonce=_nonce(config))
    judge = Judge(config, bundle, [m for _, m in panel])
    host_verdict, host_alone = judge.judge(host)
    if host_alone is None or not host_alone.is_match:
        raise RuntimeError("the host does not decode its own key: the run is meaningless")
    assert host_verdict is not None

    nulls = []
    for group, members in groups:
        for seed, model in members:
            verdict, alone = judge.judge(model)
            nulls.append(NullRow(label=group.label, seed=seed, independent=group.independent,
                                 accuracy=task.evaluate(model), verdict=_required(verdict),
                                 plain_alone=alone))

    rows = []
    for spec in tqdm(config.attacks, desc=f"{config.name}: attacks", unit="attack", disable=not progress):
        t0 = time.perf_counter()
        attacked = apply_attack(spec.kind, host, task, spec.params)
        accuracy_after = task.evaluate(attacked)
        verdict, alone = judge.judge(attacked)
        drop = host_accuracy - accuracy_after
        rows.append(AttackRow(
            attack=spec.name, kind=spec.kind, params=spec.params, accuracy_before=host_accuracy,
            accuracy_after=accuracy_after, verdict=verdict,
            status=status(verdict, drop, config.destroy_bound),
            seconds=time.perf_counter() - t0, function_preserving=spec.kind in FUNCTION_PRESERVING,
            plain_alone=alone,
            note="" if verdict is not None else "key layer changed width: the key cannot be applied",
        ))

    notes = [] if config.specificity_variant is None else [
        specificity(task, host, bundle, config.specificity_variant, config.seed)]
    result = None
    if config.overwrite_params is not None:
        params = config.overwrite_params
        stolen = apply_attack("finetune", host, task, {
            "epochs": int(params.get("epochs", 5)), "lr": float(params.get("lr", 1e-3)),
            "seed": config.seed + 1})
        result = overwrite(host, stolen, bundle, alpha=config.alpha,
                           attacker_triggers=task.triggers(config.triggers_per_class, ATTACKER_TRIGGER_SEED),
                           attacker_margin=float(params.get("attacker_margin", 0.5)))
    return Report(
        name=config.name, task=config.task, layer=bundle.layer, units=bundle.units, n_bits=bundle.n_bits,
        alpha=config.alpha, destroy_bound=config.destroy_bound, quick=config.quick,
        host_accuracy=host_accuracy, host_verdict=host_verdict, host_plain_alone=host_alone,
        rows=tuple(rows), nulls=tuple(nulls),
        panel_label=config.panel.label if config.panel else "",
        panel_seeds=tuple(seed for seed, _ in panel), panel_counts=judge.panel_counts(),
        host_units=_host_units(host_verdict),
        overwrite=result, notes=tuple(notes), seconds=time.perf_counter() - started, threads=config.threads,
        config=copy.deepcopy(dict(config.raw)),
    )


def specificity(task: Task, host: nn.Module, bundle: KeyBundle, variant: str, seed: int) -> str:
    """Can the owner get a key that the model his host started from does not decode?

    For a fine-tune of a public checkpoint the answer decides whether a registration
    claims the owner's fine-tune or, in effect, the checkpoint and all its descendants.
    """
    base = task.new_model(variant, seed)
    try:
        derive_key(host, layer=bundle.layer, triggers=bundle.triggers, owner=bundle.owner,
                   n_bits=bundle.n_bits, references=[base])
    except FreemarkError as exc:
        return f"key with the {variant!r} starting point as a reference: {exc}"
    return f"key with the {variant!r} starting point as a reference: derived (the base does not decode it)"


def _check_disjoint(panel: list[tuple[int, nn.Module]], nulls: list[nn.Module]) -> None:
    """Refuse a run whose held-out nulls include a panel member (same weights)."""
    members = {fingerprint(m) for _, m in panel}
    if any(fingerprint(m) in members for m in nulls):
        raise RuntimeError("a null model is also a panel member: its false-positive rate "
                           "would be measured on the test's own calibration")


def _host_units(verdict: Verdict) -> int:
    aligned = find_test(verdict, "aligned")
    return aligned.n if aligned is not None else 0


def _required(verdict: Verdict | None) -> Verdict:
    if verdict is None:
        raise RuntimeError("a null model's key layer has another width than the host's")
    return verdict

