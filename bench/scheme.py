"""Scheme benchmark: derivation/extraction cost, robustness vs uniqueness, trigger-set size.

Three measurements (docs/scheme.md reports and interprets them):

1. Timing on synthetic activations (ReLU of per-unit-offset Gaussians; only the cost
   matters): `derive_key` after capture (closed-form fast path), its parts, plain
   `descend`, `descend` with 5 negative models (the path `derive_key` takes with
   reference models), and `judge_activations` with the 1000-permutation null, for
   N ∈ {64, 256, 1024, 4096} bits on layers of 128 … 4096 units.
2. Robustness and uniqueness on real models: the digits CNN and the MNIST-subset CNN
   (layer "act"), stolen copies (fine-tuned, 50 % magnitude-pruned, fp16 and int8
   round-trips) against independently trained models, for margins 0.25 … 4; the
   trade-off curve (weakest stolen vs strongest independent p) is also saved as a PNG.
3. Trigger-set size (per class 1, 5, 10, 20) at the default margin.

    PYTHONPATH=client:keyserver:lab .venv/bin/python bench/scheme.py --json out/bench_scheme.json

About 6-9 minutes on two shared CPU cores; `--quick` is a < 1 minute smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _table import print_table, write_json
from torch import nn

import freemark.scheme.keygen as keygen_module
from freemark.derive import check_uniqueness, derive_key
from freemark.errors import DerivationError, UniquenessError
from freemark.extract import judge_activations
from freemark.scheme.activations import capture
from freemark.scheme.keygen import (
    DEFAULT_LAMBDA,
    DEFAULT_STEPS,
    DerivationSettings,
    anchor,
    closed_form_key,
    descend,
    normalise,
)
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark.scheme.watermark import watermark_bits
from freemark.verdict.decision import DEFAULT_ALPHA, DEFAULT_PERMUTATIONS, judge, suspect_vector
from freemark_lab.data import Dataset, digits, mnist_subset
from freemark_lab.models import DigitsCNN, MnistCNN
from freemark_lab.train import accuracy, train, trained

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = ROOT / "docs" / "scheme_tradeoff.png"
GOAL_BITS, GOAL_UNITS, GOAL_SECONDS = 256, 4096, 1.0
DEFAULT_MARGIN = 1.0
N_BITS = 256
N_NEGATIVES = 5
SYNTHETIC_TRIGGERS = 100  # 10 per class × 10 classes, the default trigger set


@dataclass(frozen=True)
class Plan:
    """Everything `--quick` shrinks."""

    bits_grid: tuple[int, ...]
    units_grid: tuple[int, ...]
    repeats: int
    warmup: bool
    full_descent_max_cells: int  # run descend-with-negatives to the end when N·M ≤ this
    probe_steps: int  # otherwise time this many steps and project to DEFAULT_STEPS
    margins: tuple[float, ...]
    per_class_grid: tuple[int, ...]
    n_independent: int
    n_keys: int
    epochs: dict[str, int]
    finetune_epochs: dict[str, tuple[int, ...]]


FULL = Plan(
    bits_grid=(64, 256, 1024, 4096), units_grid=(128, 512, 1024, 4096), repeats=3, warmup=True,
    full_descent_max_cells=256 * 128, probe_steps=10, margins=(0.25, 0.5, 1.0, 2.0, 4.0),
    per_class_grid=(1, 5, 10, 20), n_independent=5, n_keys=5,
    epochs={"digits": 20, "mnist": 8}, finetune_epochs={"digits": (20,), "mnist": (5, 20)},
)
QUICK = Plan(
    bits_grid=(64, 256), units_grid=(128, 4096), repeats=1, warmup=False,
    full_descent_max_cells=64 * 128, probe_steps=5, margins=(0.25, 1.0, 4.0),
    per_class_grid=(1, 10), n_independent=3, n_keys=2,
    epochs={"digits": 8, "mnist": 1}, finetune_epochs={"digits": (3,), "mnist": (1,)},
)


# --------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], repeats: int, warmup: bool) -> tuple[float, list[float], Any]:
    """(median seconds, all samples, last result) of `fn` over `repeats` runs, after a warm-up."""
    if warmup:
        fn()
    samples: list[float] = []
    result: Any = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples, result


class _StepCounter:
    """Stands in for tqdm inside `freemark.scheme.keygen.descend` to count the steps it takes."""

    steps = 0

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        _StepCounter.steps += n

    def close(self) -> None:
        pass


@contextlib.contextmanager
def counting_steps() -> Iterator[type[_StepCounter]]:
    """Count `descend`'s optimiser steps (it reports progress through tqdm, nothing else)."""
    original = keygen_module.tqdm
    keygen_module.tqdm = _StepCounter  # type: ignore[assignment]
    _StepCounter.steps = 0
    try:
        yield _StepCounter
    finally:
        keygen_module.tqdm = original  # type: ignore[assignment]


def seed_bytes(*parts: object) -> bytes:
    """A 32-byte value derived from the bench seed and a label: reproducible keys and nonces."""
    return hashlib.sha256("/".join(str(p) for p in ("freemark-bench",) + parts).encode()).digest()


def synthetic_preactivations(rng: np.random.Generator, n: int, units: int) -> np.ndarray:
    """Pre-activations whose ReLU looks like a real hidden layer: per-unit offsets plus noise."""
    offsets = rng.normal(0.0, 1.0, size=units)
    return (rng.standard_normal((n, units)) + offsets).astype(np.float32)


def relu_layer() -> nn.Module:
    """A model that is only a ReLU named "act": capture costs ~nothing, derive_key runs as usual."""
    return nn.Sequential(OrderedDict(act=nn.ReLU()))


# --------------------------------------------------------------------------- 1. timing


def timing_cell(n_bits: int, units: int, plan: Plan, rng: np.random.Generator) -> dict[str, Any]:
    """All timings for one (N, M) cell."""
    model = relu_layer()
    triggers = TriggerSet(inputs=synthetic_preactivations(rng, SYNTHETIC_TRIGGERS, units))
    owner, nonce = "bench@freemark", seed_bytes("timing-nonce", n_bits, units)
    reps, warm = plan.repeats, plan.warmup

    t_capture, _, (acts, _pool) = timed(lambda: capture(model, "act", triggers), reps, warm)
    t_derive, derive_samples, bundle = timed(
        lambda: derive_key(model, layer="act", triggers=triggers, owner=owner,
                           n_bits=n_bits, nonce=nonce), reps, warm)
    z = suspect_vector(acts)
    bits = watermark_bits(owner, nonce, n_bits)
    seed = seed_bytes("timing-anchor", n_bits, units)
    t_anchor, _, a0 = timed(lambda: anchor(seed, n_bits, units), reps, warm)
    t_solve, _, key = timed(lambda: closed_form_key(a0, z, bits), reps, warm)
    t_unique, _, _ = timed(lambda: check_uniqueness(key, bits, z), reps, warm)
    t_descend, _, key_gd = timed(lambda: descend(a0, z[None, :], bits), reps, warm)
    descend_error = float(np.abs(key_gd - key).max())

    negatives = np.stack([
        normalise(np.maximum(synthetic_preactivations(rng, SYNTHETIC_TRIGGERS, units), 0).mean(0))
        for _ in range(N_NEGATIVES)])
    full = n_bits * units <= plan.full_descent_max_cells
    steps_cap = DEFAULT_STEPS if full else plan.probe_steps
    with counting_steps() as counter:
        start = time.perf_counter()
        try:
            descend(a0, z[None, :], bits, negatives=negatives,
                    settings=DerivationSettings(steps=steps_cap))
            converged = True
        except DerivationError:
            converged = False
        t_neg = time.perf_counter() - start
        neg_steps = counter.steps
    per_step = t_neg / max(neg_steps, 1)

    # A suspect: the host's activations with 10 % noise, judged as the TTP does after capture.
    noisy = acts * (1.0 + 0.1 * rng.standard_normal(acts.shape))
    t_judge, _, verdict = timed(lambda: judge_activations(noisy, bundle), reps, warm)
    return {
        "n_bits": n_bits, "units": units, "n_triggers": SYNTHETIC_TRIGGERS,
        "capture_s": t_capture,
        "derive_key_s": t_derive, "derive_key_samples_s": derive_samples,
        "derive_after_capture_s": max(t_derive - t_capture, 0.0),
        "anchor_s": t_anchor, "closed_form_s": t_solve, "uniqueness_check_s": t_unique,
        "descend_plain_s": t_descend, "descend_plain_max_abs_diff_vs_closed_form": descend_error,
        "descend_negatives": {
            "negatives": N_NEGATIVES, "measured_steps": neg_steps, "ran_to_end": full,
            "margins_met": converged, "seconds": t_neg, "seconds_per_step": per_step,
            "projected_seconds_for_max_steps": per_step * DEFAULT_STEPS,
        },
        "judge_s": t_judge, "judge_permutations": DEFAULT_PERMUTATIONS,
        "judge_log10_p": verdict.log10_p_value,
    }


def steps_until_margins(n_bits: int, units: int, rng: np.random.Generator) -> dict[str, Any]:
    """Smallest step budget in a coarse ladder at which descend-with-negatives clears every margin.

    `descend` only stops early once the gradient is below 1e-9, which with negatives it
    never is within DEFAULT_STEPS; this shows how many steps the margins actually need.
    """
    acts = np.maximum(synthetic_preactivations(rng, SYNTHETIC_TRIGGERS, units), 0)
    z = normalise(acts.mean(0))
    bits = watermark_bits("bench@freemark", seed_bytes("ladder-nonce"), n_bits)
    a0 = anchor(seed_bytes("ladder-anchor"), n_bits, units)
    negatives = np.stack([
        normalise(np.maximum(synthetic_preactivations(rng, SYNTHETIC_TRIGGERS, units), 0).mean(0))
        for _ in range(N_NEGATIVES)])
    for budget in (10, 25, 50, 100, 250, DEFAULT_STEPS):
        start = time.perf_counter()
        try:
            key = descend(a0, z[None, :], bits, negatives=negatives,
                          settings=DerivationSettings(steps=budget))
        except DerivationError:
            continue
        closed = closed_form_key(a0, z, bits)
        return {"n_bits": n_bits, "units": units, "steps": budget,
                "seconds": time.perf_counter() - start,
                "max_abs_negative_projection": float(np.abs(key @ negatives.T).max()),
                "closed_form_max_abs_negative_projection":
                    float(np.abs(closed @ negatives.T).max())}
    return {"n_bits": n_bits, "units": units, "steps": None}


def bench_timing(plan: Plan, seed: int) -> dict[str, Any]:
    """Section 1: the grid of cells, printed as three tables, plus the goal check."""
    rng = np.random.default_rng(seed)
    cells = []
    for n_bits in plan.bits_grid:
        for units in plan.units_grid:
            cells.append(timing_cell(n_bits, units, plan, rng))
            print(f"  timed N={n_bits} units={units}", flush=True)
    print()
    print_table(
        "1a. derive_key, closed-form fast path (median s; after capture = derive_key − capture)",
        ["N", "units", "capture", "derive_key", "after capture", "anchor", "closed form",
         "uniqueness chk"],
        [[c["n_bits"], c["units"], c["capture_s"], c["derive_key_s"], c["derive_after_capture_s"],
          c["anchor_s"], c["closed_form_s"], c["uniqueness_check_s"]] for c in cells])
    print_table(
        f"1b. gradient descent (s): plain (one host) and with {N_NEGATIVES} negatives "
        f"(max {DEFAULT_STEPS} steps; 'proj' = s/step × {DEFAULT_STEPS} where only probed)",
        ["N", "units", "plain", "|gd−closed|", "neg steps run", "neg s/step", "neg total",
         "measured"],
        [[c["n_bits"], c["units"], c["descend_plain_s"],
          c["descend_plain_max_abs_diff_vs_closed_form"],
          c["descend_negatives"]["measured_steps"], c["descend_negatives"]["seconds_per_step"],
          c["descend_negatives"]["seconds"] if c["descend_negatives"]["ran_to_end"]
          else c["descend_negatives"]["projected_seconds_for_max_steps"],
          "full" if c["descend_negatives"]["ran_to_end"] else "proj"] for c in cells])
    print_table(
        f"1c. judge_activations with the {DEFAULT_PERMUTATIONS}-permutation null (median s)",
        ["N", "units", "judge", "log10 p (noisy host)"],
        [[c["n_bits"], c["units"], c["judge_s"], c["judge_log10_p"]] for c in cells])
    ladder = steps_until_margins(GOAL_BITS, GOAL_UNITS, rng)
    print(f"descend with {N_NEGATIVES} negatives at N={GOAL_BITS}, units={GOAL_UNITS}: "
          f"every margin clears m within {ladder['steps']} steps "
          f"(ladder 10/25/50/100/250/500)\n", flush=True)
    goal = next((c for c in cells if c["n_bits"] == GOAL_BITS and c["units"] == GOAL_UNITS), None)
    goal_report: dict[str, Any] = {"n_bits": GOAL_BITS, "units": GOAL_UNITS,
                                   "limit_s": GOAL_SECONDS}
    if goal is not None:
        goal_report.update(after_capture_s=goal["derive_after_capture_s"],
                           judge_s=goal["judge_s"],
                           holds=goal["derive_after_capture_s"] < GOAL_SECONDS)
        print(f"goal: N={GOAL_BITS} on a {GOAL_UNITS}-unit layer derives in "
              f"{goal['derive_after_capture_s']:.3f} s after capture (limit {GOAL_SECONDS} s): "
              f"{'HOLDS' if goal_report['holds'] else 'MISSED'}; judging takes "
              f"{goal['judge_s']:.3f} s\n", flush=True)
    return {"cells": cells, "descend_steps_until_margins": ladder, "goal": goal_report}


# --------------------------------------------------------------------------- 2-3. real models


@dataclass
class Suspect:
    """One model judged against the host's keys."""

    name: str
    role: str  # "host", "stolen" or "independent"
    accuracy: float
    model: nn.Module


@dataclass
class Task:
    """A dataset, its host, the stolen copies and the independent models."""

    name: str
    data: Dataset
    suspects: list[Suspect] = field(default_factory=list)

    @property
    def host(self) -> Suspect:
        return next(s for s in self.suspects if s.role == "host")


def prune_global(model: nn.Module, fraction: float) -> nn.Module:
    """A copy with the `fraction` smallest-magnitude conv+linear weights (globally) set to 0."""
    pruned = copy.deepcopy(model)
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = int(fraction * magnitudes.numel())
    threshold = torch.kthvalue(magnitudes, k).values if k > 0 else torch.tensor(-1.0)
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return pruned


def int8_roundtrip(model: nn.Module) -> nn.Module:
    """A copy with every parameter quantized to per-tensor symmetric int8 and dequantized."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for p in quantized.parameters():
            scale = p.abs().max() / 127.0
            if scale > 0:
                p.copy_(torch.clamp(torch.round(p / scale), -127, 127) * scale)
    return quantized


def fp16_roundtrip(model: nn.Module) -> nn.Module:
    """A copy stored in half precision and cast back (model.half().float())."""
    return copy.deepcopy(model).half().float()


def build_task(name: str, plan: Plan, seed: int) -> Task:
    """Train the host, attack it four ways, and train the independent models; all seeded."""
    data = digits() if name == "digits" else mnist_subset()
    arch: type[nn.Module] = DigitsCNN if name == "digits" else MnistCNN
    epochs = plan.epochs[name]
    start = time.perf_counter()

    def acc(model: nn.Module) -> float:
        return accuracy(model, data.x_test, data.y_test)

    host = trained(arch, data.x_train, data.y_train, epochs=epochs, seed=seed)
    task = Task(name, data, [Suspect("host", "host", acc(host), host)])
    copies: list[tuple[str, nn.Module]] = []
    for ft_epochs in plan.finetune_epochs[name]:  # all layers, Adam lr 1e-3, the owner's data
        finetuned = train(copy.deepcopy(host), data.x_train, data.y_train, epochs=ft_epochs,
                          lr=1e-3, seed=seed + 1000)
        copies.append((f"fine-tuned {ft_epochs} ep", finetuned))
    for label, model in [*copies,
                         ("pruned 50%", prune_global(host, 0.5)),
                         ("fp16", fp16_roundtrip(host)),
                         ("int8", int8_roundtrip(host))]:
        task.suspects.append(Suspect(label, "stolen", acc(model), model))
    for i in range(1, plan.n_independent + 1):
        model = trained(arch, data.x_train, data.y_train, epochs=epochs, seed=seed + i)
        task.suspects.append(Suspect(f"independent s{seed + i}", "independent", acc(model), model))
    print(f"  {name}: trained host + {len(task.suspects) - 1} suspects in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return task


@dataclass(frozen=True)
class Key:
    """One reproducible key: its watermark and anchor (the margin is applied per use)."""

    index: int
    bits: np.ndarray
    anchor_seed: bytes


def make_keys(plan: Plan, seed: int) -> list[Key]:
    """`plan.n_keys` keys with distinct owners, nonces and anchors."""
    return [Key(i, watermark_bits(f"owner-{i}@bench", seed_bytes(seed, "nonce", i), N_BITS),
                seed_bytes(seed, "anchor", i)) for i in range(plan.n_keys)]


def judge_all(task: Task, triggers: TriggerSet, keys: Sequence[Key],
              margins: Sequence[float]) -> list[dict[str, Any]]:
    """Every (margin, key, suspect) verdict, keyed as the derivation with no references does it.

    The key is `closed_form_key` on the host's z, exactly what `derive_key` computes when
    no reference models are given, but with a fixed anchor and watermark per key so that
    only the margin changes between columns.
    """
    zs = {s.name: suspect_vector(capture(s.model, "act", triggers)[0]) for s in task.suspects}
    host_z = zs["host"]
    units = len(host_z)
    results = []
    for margin in margins:
        for key in keys:
            a0 = anchor(key.anchor_seed, N_BITS, units)
            matrix = closed_form_key(a0, host_z, key.bits, margin=margin, lam=DEFAULT_LAMBDA)
            try:
                check_uniqueness(matrix, key.bits, host_z)
                refused = False
            except UniquenessError:
                refused = True
            for s in task.suspects:
                v = judge(matrix, key.bits, zs[s.name])
                results.append({
                    "task": task.name, "margin": margin, "key": key.index, "suspect": s.name,
                    "role": s.role, "n_triggers": len(triggers), "matches": v.matches,
                    "ber": v.ber, "log10_p": v.log10_p_value,
                    "log10_p_binomial": v.log10_p_value_binomial, "is_match": v.is_match,
                    "key_refused": refused,
                })
    return results


def _select(rows: Sequence[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def tradeoff(rows: Sequence[dict[str, Any]], task: str,
             margins: Sequence[float]) -> list[dict[str, Any]]:
    """Per margin: weakest (max) log10 p over stolen copies × keys vs strongest (min) over
    independents × keys, plus medians and counts at α and at 1e-3."""
    curve = []
    for m in margins:
        stolen = _select(rows, task=task, margin=m, role="stolen")
        indep = _select(rows, task=task, margin=m, role="independent")
        host = _select(rows, task=task, margin=m, role="host")
        curve.append({
            "task": task, "margin": m,
            "host_median_log10_p": statistics.median(r["log10_p"] for r in host),
            "stolen_weakest_log10_p": max(r["log10_p"] for r in stolen),
            "stolen_median_log10_p": statistics.median(r["log10_p"] for r in stolen),
            "stolen_detected": sum(r["is_match"] for r in stolen), "stolen_total": len(stolen),
            "independent_strongest_log10_p": min(r["log10_p"] for r in indep),
            "independent_median_log10_p": statistics.median(r["log10_p"] for r in indep),
            "independent_strongest_log10_p_binomial": min(r["log10_p_binomial"] for r in indep),
            "independent_false_matches": sum(r["is_match"] for r in indep),
            "independent_below_1e-3": sum(r["log10_p"] <= -3 for r in indep),
            "independent_total": len(indep),
            "keys_refused": sum(r["key_refused"] for r in host),
        })
    return curve


def print_robustness(task: Task, rows: Sequence[dict[str, Any]], margins: Sequence[float],
                     n_keys: int) -> None:
    """Per margin: one row per suspect, medians over keys and the worst case."""
    for m in margins:
        table = []
        for s in task.suspects:
            sel = _select(rows, task=task.name, margin=m, suspect=s.name)
            ps = [r["log10_p"] for r in sel]
            worst = min(ps) if s.role == "independent" else max(ps)
            table.append([s.name, s.role, s.accuracy,
                          statistics.median(r["matches"] for r in sel),
                          statistics.median(r["ber"] for r in sel),
                          statistics.median(ps), worst,
                          statistics.median(r["log10_p_binomial"] for r in sel)])
        print_table(
            f"2. {task.name}, margin {m}: N={N_BITS}, median over {n_keys} keys "
            f"(worst = max log10 p for host/stolen, min for independents)",
            ["suspect", "role", "test acc", "matches", "BER", "log10 p cal", "worst",
             "log10 p binom"], table)


def print_pivot(task: Task, rows: Sequence[dict[str, Any]], margins: Sequence[float]) -> None:
    """Median calibrated log10 p per suspect (rows) and margin (columns)."""
    table = [[s.name, s.accuracy] + [statistics.median(r["log10_p"] for r in
                                                        _select(rows, task=task.name, margin=m,
                                                                suspect=s.name))
                                      for m in margins] for s in task.suspects]
    print_table(f"2. {task.name}: median calibrated log10 p by margin",
                ["suspect", "test acc"] + [f"m={m}" for m in margins], table)


def print_tradeoff(curve: Sequence[dict[str, Any]]) -> None:
    """The trade-off table (all tasks)."""
    print_table(
        f"2. trade-off: weakest stolen vs strongest independent (log10 p; α = {DEFAULT_ALPHA:g})",
        ["task", "margin", "host med", "stolen weakest", "stolen med", "detected",
         "indep strongest", "indep med", "indep strongest binom", "indep p≤1e-3",
         "keys refused"],
        [[c["task"], c["margin"], c["host_median_log10_p"], c["stolen_weakest_log10_p"],
          c["stolen_median_log10_p"], f"{c['stolen_detected']}/{c['stolen_total']}",
          c["independent_strongest_log10_p"], c["independent_median_log10_p"],
          c["independent_strongest_log10_p_binomial"],
          f"{c['independent_below_1e-3']}/{c['independent_total']}", c["keys_refused"]]
         for c in curve])


def plot_tradeoff(curve: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels (one per task): log10 p against margin for stolen and independent models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c["task"] for c in curve))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        pts = [c for c in curve if c["task"] == task]
        ms = [c["margin"] for c in pts]
        ax.plot(ms, [c["host_median_log10_p"] for c in pts], "k.-", label="host (median)")
        ax.plot(ms, [c["stolen_weakest_log10_p"] for c in pts], "o-", color="tab:red",
                label="stolen, weakest (max p)")
        ax.plot(ms, [c["stolen_median_log10_p"] for c in pts], "--", color="tab:red", alpha=0.6,
                label="stolen, median")
        ax.plot(ms, [c["independent_strongest_log10_p"] for c in pts], "s-", color="tab:blue",
                label="independent, strongest (min p), calibrated")
        ax.plot(ms, [c["independent_strongest_log10_p_binomial"] for c in pts], ":",
                color="tab:blue", label="independent, strongest, naive binomial")
        ax.axhline(math.log10(DEFAULT_ALPHA), color="gray", lw=1, ls="-.")
        ax.text(ms[0], math.log10(DEFAULT_ALPHA) + 0.8, f"α = {DEFAULT_ALPHA:g}", color="gray",
                fontsize=8)
        ax.axhline(-3, color="gray", lw=0.8, ls=":")
        ax.text(ms[0], -4.6, "uniqueness 1e-3", color="gray", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [f"{m:g}" for m in ms])
        ax.set_xlabel("margin m")
        ax.set_ylabel("log10 p-value")
        ax.set_title(f"{task}: N={N_BITS}, worst case over keys and models")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_triggers(task: Task, keys: Sequence[Key], plan: Plan, seed: int) -> list[dict[str, Any]]:
    """Section 3: trigger-set size at the default margin (fine-tuned = the longest fine-tune)."""
    out = []
    ft_name = [s.name for s in task.suspects if s.name.startswith("fine-tuned")][-1]
    for per_class in plan.per_class_grid:
        triggers = select_triggers(task.data.x_train, task.data.y_train, per_class=per_class,
                                   seed=seed)
        rows = judge_all(task, triggers, keys, [DEFAULT_MARGIN])
        ft = _select(rows, suspect=ft_name)
        stolen = _select(rows, role="stolen")
        indep = _select(rows, role="independent")
        out.append({
            "task": task.name, "per_class": per_class, "finetuned_copy": ft_name,
            "n_triggers": len(triggers),
            "finetuned_median_ber": statistics.median(r["ber"] for r in ft),
            "finetuned_median_log10_p": statistics.median(r["log10_p"] for r in ft),
            "finetuned_weakest_log10_p": max(r["log10_p"] for r in ft),
            "stolen_weakest_log10_p": max(r["log10_p"] for r in stolen),
            "stolen_detected": sum(r["is_match"] for r in stolen), "stolen_total": len(stolen),
            "independent_strongest_log10_p": min(r["log10_p"] for r in indep),
            "independent_median_log10_p": statistics.median(r["log10_p"] for r in indep),
            "independent_strongest_log10_p_binomial": min(r["log10_p_binomial"] for r in indep),
            "rows": rows,
        })
    return out


def print_triggers(results: Sequence[dict[str, Any]]) -> None:
    """The trigger-set size table (all tasks)."""
    print_table(
        f"3. trigger-set size at margin {DEFAULT_MARGIN} (log10 p; ft = the longest fine-tune)",
        ["task", "per class", "triggers", "ft BER med", "ft med", "ft weakest", "stolen weakest",
         "detected", "indep strongest", "indep med", "indep strongest binom"],
        [[r["task"], r["per_class"], r["n_triggers"], r["finetuned_median_ber"],
          r["finetuned_median_log10_p"], r["finetuned_weakest_log10_p"],
          r["stolen_weakest_log10_p"], f"{r['stolen_detected']}/{r['stolen_total']}",
          r["independent_strongest_log10_p"], r["independent_median_log10_p"],
          r["independent_strongest_log10_p_binomial"]] for r in results])


def bench_models(plan: Plan, seed: int, plot: Path | None) -> dict[str, Any]:
    """Sections 2 and 3 on the digits and MNIST-subset CNNs."""
    keys = make_keys(plan, seed)
    all_rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    trigger_results: list[dict[str, Any]] = []
    models: dict[str, list[dict[str, Any]]] = {}
    for name in ("digits", "mnist"):
        task = build_task(name, plan, seed)
        models[name] = [{"name": s.name, "role": s.role, "accuracy": s.accuracy}
                        for s in task.suspects]
        triggers = select_triggers(task.data.x_train, task.data.y_train, seed=seed)
        rows = judge_all(task, triggers, keys, plan.margins)
        all_rows.extend(rows)
        print_robustness(task, rows, plan.margins, len(keys))
        print_pivot(task, rows, plan.margins)
        curve.extend(tradeoff(rows, name, plan.margins))
        trigger_results.extend(bench_triggers(task, keys, plan, seed))
    print_tradeoff(curve)
    print_triggers(trigger_results)
    if plot is not None:
        plot_tradeoff(curve, plot)
        print(f"trade-off plot: {plot}\n", flush=True)
    return {"n_bits": N_BITS, "n_keys": len(keys), "margins": list(plan.margins),
            "default_margin": DEFAULT_MARGIN, "alpha": DEFAULT_ALPHA,
            "epochs": plan.epochs, "finetune_epochs": plan.finetune_epochs,
            "models": models, "verdicts": all_rows, "tradeoff": curve,
            "trigger_size": trigger_results}


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three sections, print the tables, write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--quick", action="store_true", help="small grids: a < 1 minute smoke run")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds models, attacks, keys and triggers (default 0)")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"trade-off PNG (default {DEFAULT_PLOT.relative_to(ROOT)} for a full "
                             "run, none for --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 OpenMP "
                             "threads spin against other jobs and train 10x slower; "
                             "see docs/scheme.md)")
    parser.add_argument("--skip-timing", action="store_true", help="only the real-model sections")
    parser.add_argument("--skip-models", action="store_true", help="only the timing section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    plot = args.plot if args.plot is not None else (None if args.quick else DEFAULT_PLOT)
    started = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "scheme", "quick": args.quick, "seed": args.seed,
                               "threads": args.threads, "plan": plan.__dict__}
    if not args.skip_timing:
        payload["timing"] = bench_timing(plan, args.seed)
    if not args.skip_models:
        payload["robustness"] = bench_models(plan, args.seed, plot)
    payload["elapsed_s"] = time.perf_counter() - started
    print(f"total {payload['elapsed_s']:.0f} s", flush=True)
    if args.json is not None:
        print(f"written: {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
