"""Aligned-test benchmark (issue 9): what seeing through relabelled units costs, in one run.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/aligned.py --json out/bench_aligned.json

About 6-7 minutes on two shared cores; `--quick` is a 1-2 minute smoke run (widths 128 and
1,024, the server part on the 1,024-unit model). docs/aligned-bench.md has the figures and
what limits each.

Models: for every width, a DigitsCNN (lab) whose key layer `act` has that many units,
trained briefly on scikit-learn's digits (the host), a copy of it fine-tuned one epoch and
then relabelled (the suspect: what the aligned test exists for), and five independently
trained models of the same width (the panel). The key is `derive_key`'s default, with 1,024
alignment probes. Activations are real ReLU activations of trained models, so the dead units
and near-duplicates that canonicalisation removes are there in realistic numbers.

(a) Alignment cost against width (in process, no server): `freemark.verdict.canon.align` (host
    profile vs suspect), `freemark.verdict.aligned.aligned_test` (host vs suspect with the 5-member
    panel: 7 canonicalisations, 6 matchings), and the parts of the latter (canonicalise,
    similarity product, Hungarian step) measured alone. Floors measured in the same run on
    the same layer: the plain verdict (`extract.judge_activations` without a panel: the
    1,000-permutation null), and one Gram product X^T X of the 1,024 x width probe matrix
    (the same size as one similarity product). Memory: tracemalloc's peak (numpy's buffers)
    and the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs; it
    also sees SciPy's C++ buffers, which tracemalloc does not).
(b) Verify through a real key server (in process, `create_server` on port 0, real sandbox
    subprocess per model) on the widest model: the same host registered three times in turn
    (one active registration per host fingerprint, so each is revoked before the next):
    a key without probes (Verify as before issue 9), a key with probes but no panel (the
    suspect is read on 1,024 extra inputs, the aligned test does not run), and a key with
    probes and a 5-model panel (the aligned test runs). The same suspect is verified against
    each, median of several calls; then the parts alone: sandbox start (a fresh python
    doing the worker's imports), the sandbox run on the triggers alone and on triggers plus
    probes, opening the sealed panel, and the in-process verdict, with and without panel.
    A cProfile of the aligned verdict names the functions that dominate.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import io
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _table import print_table, write_json
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm import tqdm

from freemark.derive import derive_key
from freemark.extract import judge_activations
from freemark.formats.pt2 import save_program
from freemark.panel import Reference, count_for, measure_reference
from freemark.reading import read_layer
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark.verdict import aligned, canon
from freemark_keyserver.config import UNLIMITED, ServerConfig, default_policy
from freemark_keyserver.handlers import panels
from freemark_keyserver.sandbox.limits import SandboxLimits, worker_environment
from freemark_keyserver.sandbox.runner import run_model
from freemark_keyserver.server import create_server
from freemark_lab.attacks import obfuscate
from freemark_lab.data import Dataset, digits
from freemark_lab.models import DigitsCNN
from freemark_lab.tasks import image_task
from freemark_lab.train import accuracy, train
from ttp_fleet import add_principals

MB = 1_000_000
GOAL_RATIO = 1.5  # issue 9: aligned Verify within 1.5x of plain Verify
PANEL_SEEDS = (20, 21, 22, 23, 24)
HOST_SEED, FINETUNE_SEED, PERMUTE_SEED = 1, 7, 3
EXAMPLE = (torch.zeros(2, 1, 8, 8),)
# What a sandbox worker imports before its model runs (as bench/keyserver.py measures it).
_WORKER_IMPORTS = ("numpy", "torch", "torch._export.serde.serialize", "freemark.scheme.activations",
                   "freemark.formats.pt2", "freemark.formats.pt2_vetting")


@dataclass(frozen=True)
class Plan:
    """Everything `--quick` shrinks."""

    widths: tuple[int, ...]
    epochs: int  # host and panel training on digits
    finetune_epochs: int
    repeats: int  # timing repeats for widths up to `repeat_below`
    repeat_below: int  # wider layers are timed once (the 4,096-unit aligned test is ~15 s)
    verify_width: int
    verify_repeats: int
    split_repeats: int
    start_repeats: int


FULL = Plan(widths=(128, 256, 512, 1024, 2048, 4096), epochs=3, finetune_epochs=1, repeats=3,
            repeat_below=1024, verify_width=4096, verify_repeats=3, split_repeats=2,
            start_repeats=3)
QUICK = Plan(widths=(128, 1024), epochs=2, finetune_epochs=1, repeats=1, repeat_below=1024,
             verify_width=1024, verify_repeats=1, split_repeats=1, start_repeats=1)


# --- measurement helpers ----------------------------------------------------------------------


def median_time(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise ValueError(f"no {field} in /proc/self/status")


def _reset_high_water() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_of(work: Callable[[], object]) -> dict[str, float | None]:
    """tracemalloc's peak during `work`, and how far the process's peak RSS rose above its RSS
    before it (None where the kernel refuses to reset the high-water mark)."""
    can_reset = _reset_high_water()
    before = _status_mb("VmRSS")
    tracemalloc.start()
    try:
        work()
        peak = tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()
    rise = _status_mb("VmHWM") - before if can_reset else None
    return {"tracemalloc_peak_mb": peak, "rss_rise_mb": rise}


# --- models ---------------------------------------------------------------------------------


@dataclass
class Width:
    """One width's host, suspect and panel, read on the key's triggers and probes."""

    units: int
    host: nn.Module
    suspect: nn.Module
    panel_models: list[nn.Module]
    bundle: KeyBundle
    suspect_triggers: np.ndarray
    suspect_probes: np.ndarray
    panel: list[Reference]
    accuracy: dict[str, float]


def trained_model(data: Dataset, units: int, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    return train(DigitsCNN(hidden=units), data.x_train, data.y_train, epochs=epochs, seed=seed)


def build_width(data: Dataset, triggers: TriggerSet, units: int, plan: Plan,
                bar: tqdm) -> Width:
    host = trained_model(data, units, HOST_SEED, plan.epochs)
    bar.update()
    tuned = train(copy.deepcopy(host), data.x_train, data.y_train,
                  epochs=plan.finetune_epochs, seed=FINETUNE_SEED)
    suspect = obfuscate.permute_units(tuned, image_task("digits"), seed=PERMUTE_SEED)
    bar.update()
    panel_models = []
    for seed in PANEL_SEEDS:
        panel_models.append(trained_model(data, units, seed, plan.epochs))
        bar.update()
    bundle = derive_key(host, layer="act", triggers=triggers, owner="bench@freemark")
    suspect_triggers, suspect_probes = read_layer(suspect, bundle, probes=True)
    assert suspect_probes is not None
    panel = [measure_reference(m, bundle) for m in panel_models]
    acc = {"host": accuracy(host, data.x_test, data.y_test),
           "suspect": accuracy(suspect, data.x_test, data.y_test),
           "panel_min": min(accuracy(m, data.x_test, data.y_test) for m in panel_models)}
    return Width(units, host, suspect, panel_models, bundle, suspect_triggers, suspect_probes,
                 panel, acc)


# --- (a) alignment cost against width ---------------------------------------------------------


def aligned_parts(host_probes: np.ndarray, suspect_probes: np.ndarray,
                  panel_probes: Sequence[np.ndarray]) -> dict[str, float]:
    """`aligned_test`'s work split into its steps, each timed alone (seconds, summed over
    the host's and the suspect's canonicalisations and the one matching a verdict does);
    the panel members are canonicalised only for their live-unit counts (their matchings
    are done once, when the panel is measured)."""
    began = time.perf_counter()
    host = canon.canonicalise(host_probes)
    suspect = canon.canonicalise(suspect_probes)
    canonicalise_s = time.perf_counter() - began
    others = [suspect, *(canon.canonicalise(p) for p in panel_probes)]
    similarity_s = hungarian_s = 0.0
    for other in others[:1]:
        began = time.perf_counter()
        similarity = np.abs(host.profiles.T @ other.profiles)
        similarity_s += time.perf_counter() - began
        began = time.perf_counter()
        linear_sum_assignment(similarity, maximize=True)
        hungarian_s += time.perf_counter() - began
    return {"canonicalise_s": canonicalise_s, "similarity_s": similarity_s,
            "hungarian_s": hungarian_s, "host_live_units": host.units,
            "suspect_live_units": others[0].units,
            "panel_live_units_min": min(o.units for o in others[1:])}


def alignment_cost(width: Width, plan: Plan) -> dict[str, Any]:
    bundle = width.bundle
    assert bundle.probe_profile is not None
    host_probes = bundle.probe_profile
    panel_probes = [r.probe_activations for r in width.panel]
    panel_counts = [count_for(r, bundle) for r in width.panel]  # measured with the panel
    repeats = plan.repeats if width.units <= plan.repeat_below else 1
    gram_input = np.asarray(host_probes, dtype=np.float64)

    def plain() -> object:
        return judge_activations(width.suspect_triggers, bundle)

    def align() -> object:
        return canon.align(host_probes, width.suspect_probes)

    def test() -> aligned.AlignedTest:
        return aligned.aligned_test(host_probes, width.suspect_probes, panel_counts)

    for warm_up in (plain, lambda: gram_input.T @ gram_input):  # first-call costs (BLAS, caches)
        warm_up()
    floor_plain_s = median_time(repeats, plain)
    floor_gram_s = median_time(repeats, lambda: gram_input.T @ gram_input)
    align_s = median_time(repeats, align)
    test_s = median_time(repeats, test)
    parts = aligned_parts(host_probes, width.suspect_probes, panel_probes)
    result = test()
    return {
        "units": width.units, "probes": bundle.probes, "panel": len(width.panel),
        "repeats": repeats, "accuracy": width.accuracy,
        "plain_verdict_s": floor_plain_s, "gram_product_s": floor_gram_s,
        "align_s": align_s, "aligned_test_s": test_s,
        "align_x_plain": align_s / floor_plain_s, "aligned_test_x_plain": test_s / floor_plain_s,
        "align_x_gram": align_s / floor_gram_s, "aligned_test_x_gram": test_s / floor_gram_s,
        **parts,
        "align_memory": memory_of(align), "aligned_test_memory": memory_of(test),
        "plain_verdict_memory": memory_of(plain),
        "matched_units": result.matched_units, "panel_counts": list(result.panel_counts),
        "log10_p_value": result.log10_p_value,
    }


def print_alignment(rows: list[dict[str, Any]]) -> None:
    print_table("(a) alignment cost against width (s, median; 1,024 probes, 5-member panel)",
                ["units", "live", "plain verdict", "Gram XᵀX", "align", "aligned_test",
                 "align x plain", "test x plain", "test x Gram"],
                [[r["units"], r["host_live_units"], r["plain_verdict_s"], r["gram_product_s"],
                  r["align_s"], r["aligned_test_s"], r["align_x_plain"],
                  r["aligned_test_x_plain"], r["aligned_test_x_gram"]] for r in rows])
    print_table("(a) aligned_test's parts, each alone (s, summed over 2 canonicalisations and "
                "1 matching)",
                ["units", "live host/suspect/panel min", "canonicalise", "similarity",
                 "Hungarian", "dominant"],
                [[r["units"], (f"{r['host_live_units']}/{r['suspect_live_units']}/"
                   f"{r['panel_live_units_min']}"), r["canonicalise_s"], r["similarity_s"],
                  r["hungarian_s"], max(("canonicalise", "similarity", "Hungarian"),
                                        key=lambda k: r[k.lower() + "_s"])] for r in rows])
    print_table("(a) memory (MB): tracemalloc peak / peak-RSS rise",
                ["units", "plain verdict", "align", "aligned_test", "T suspect", "T panel",
                 "log10 p"],
                [[r["units"], _mem(r["plain_verdict_memory"]), _mem(r["align_memory"]),
                  _mem(r["aligned_test_memory"]), r["matched_units"],
                  " ".join(map(str, r["panel_counts"])), r["log10_p_value"]] for r in rows])


def _mem(memory: dict[str, float | None]) -> str:
    rise = memory["rss_rise_mb"]
    return f"{memory['tracemalloc_peak_mb']:.0f} / {'-' if rise is None else f'{rise:.0f}'}"


# --- (b) Verify through a real key server -----------------------------------------------------


CONFIGS = ("no probes (pre-issue-9 key)", "probes, no panel", "probes + 5-model panel")


def verify_through_server(width: Width, triggers: TriggerSet, work: Path, plan: Plan
                          ) -> dict[str, Any]:
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    host_path, suspect_path = models / "host.pt2", models / "suspect.pt2"
    save_program(width.host, EXAMPLE, host_path)
    save_program(width.suspect, EXAMPLE, suspect_path)
    references = []
    for seed, model in zip(PANEL_SEEDS, width.panel_models, strict=True):
        references.append(models / f"reference{seed}.pt2")
        save_program(model, EXAMPLE, references[-1])
    # One owner, one host, the same triggers; the probe key is registered twice, without and
    # with the panel (the registration in between is revoked).
    no_probes = derive_key(width.host, layer="act", triggers=triggers, owner="alice", probes=0)
    with_probes = derive_key(width.host, layer="act", triggers=triggers, owner="alice")
    bundles = {CONFIGS[0]: (no_probes, []), CONFIGS[1]: (with_probes, []),
               CONFIGS[2]: (with_probes, references)}

    # The judge reads every test's statistics: a server that discloses them to arbiters.
    # Every attack is verified against one registration: the rate limits are lifted.
    config = ServerConfig(data_dir=work / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                          verdict_policy=default_policy("full"), verify_rate_principal=UNLIMITED,
                          verify_rate_registration=UNLIMITED, register_rate_principal=UNLIMITED)
    running = create_server(config)  # the real sandbox: one worker subprocess per model
    tokens = add_principals(config.database, [("alice", "owner"), ("judge", "arbiter")])
    address = f"127.0.0.1:{running.port}"
    rows: dict[str, dict[str, Any]] = {}
    try:
        with KeyServiceClient(address, token=tokens["alice"], timeout=900) as owner, \
                KeyServiceClient(address, token=tokens["judge"], timeout=900) as judge:
            bar = tqdm(total=len(CONFIGS) * (1 + plan.verify_repeats), desc="(b) Verify",
                       unit="call", file=sys.stderr)
            for label in CONFIGS:
                bundle, refs = bundles[label]
                began = time.perf_counter()
                receipt = owner.register(bundle, host_path, references=refs)
                register_s = time.perf_counter() - began
                bar.update()
                times, verdict = [], None
                for _ in range(plan.verify_repeats):
                    began = time.perf_counter()
                    verdict = judge.verify(receipt.registration_id, suspect_path)
                    times.append(time.perf_counter() - began)
                    bar.update()
                assert verdict is not None
                tests = {t.name: t for t in verdict.tests}
                rows[label] = {"register_s": register_s, "verify_s": statistics.median(times),
                               "verify_samples_s": times, "outcome": verdict.outcome,
                               "log10_p_value": verdict.log10_p_value,
                               "tests": {n: t.log10_p_value for n, t in tests.items()},
                               "panel": verdict.panel.size}
                owner.revoke(receipt.registration_id, "benchmark: next configuration")
            bar.close()
    finally:
        running.stop(0)
    plain = rows[CONFIGS[1]]["verify_s"]
    for row in rows.values():
        row["x_probes_no_panel"] = row["verify_s"] / plain
        row["x_no_probes"] = row["verify_s"] / rows[CONFIGS[0]]["verify_s"]
    split = verify_split(width, width.bundle, suspect_path, plan)
    return {"units": width.units, "calls": rows, "split": split,
            "goal_ratio": GOAL_RATIO,
            "aligned_x_plain": rows[CONFIGS[2]]["verify_s"] / plain,
            "aligned_x_no_probes": rows[CONFIGS[2]]["verify_s"] / rows[CONFIGS[0]]["verify_s"]}


def verify_split(width: Width, bundle: KeyBundle, suspect: Path, plan: Plan) -> dict[str, Any]:
    """Verify's parts, each measured alone, on the same suspect and key."""
    limits = SandboxLimits()
    with tempfile.TemporaryDirectory() as home:
        env = worker_environment(limits, Path(home))
        argv = [sys.executable, "-c", "import " + ", ".join(_WORKER_IMPORTS)]
        start_s = median_time(plan.start_repeats, lambda: subprocess.run(argv, env=env,
                                                                         check=True))
    run_triggers_s = median_time(plan.split_repeats, lambda: run_model(
        suspect, layer=bundle.layer, pooling=bundle.pooling, triggers=bundle.triggers,
        limits=limits))
    run_probes_s = median_time(plan.split_repeats, lambda: run_model(
        suspect, layer=bundle.layer, pooling=bundle.pooling, triggers=bundle.triggers,
        probes=bundle.probes, limits=limits))
    # The panel as the key server seals it (float32 on the wire), opened as Verify opens it.
    sealed = panels.seal_bytes(bundle, width.panel)
    open_s = median_time(plan.split_repeats, lambda: panels.open_bytes(sealed))
    _, panel = panels.open_bytes(sealed)
    judge_plain_s = median_time(plan.split_repeats, lambda: judge_activations(
        width.suspect_triggers, bundle, probe_activations=width.suspect_probes))
    judge_panel_s = median_time(plan.split_repeats, lambda: judge_activations(
        width.suspect_triggers, bundle, probe_activations=width.suspect_probes, panel=panel))
    profiler = cProfile.Profile()
    profiler.enable()
    judge_activations(width.suspect_triggers, bundle, probe_activations=width.suspect_probes,
                      panel=panel)
    profiler.disable()
    return {"sandbox_start_s": start_s, "sandbox_run_triggers_s": run_triggers_s,
            "sandbox_run_triggers_probes_s": run_probes_s,
            "probe_forward_extra_s": run_probes_s - run_triggers_s,
            "open_sealed_panel_s": open_s, "sealed_panel_mb": len(sealed) / MB,
            "verdict_plain_s": judge_plain_s, "verdict_panel_s": judge_panel_s,
            "aligned_extra_s": judge_panel_s - judge_plain_s,
            "profile_top": top_functions(profiler, 8)}


def top_functions(profiler: cProfile.Profile, count: int) -> list[dict[str, Any]]:
    """The `count` functions with the most own time (tottime), as (name, calls, seconds)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "tottime_s": tottime, "cumtime_s": cumtime}
            for (file, line, name), (_, calls, tottime, cumtime, _) in rows[:count]]


def print_verify(result: dict[str, Any]) -> None:
    calls = result["calls"]
    print_table(f"(b) Verify of a permuted fine-tuned copy, {result['units']}-unit model, real "
                f"sandbox (s, median); goal: with panel ≤ {GOAL_RATIO} x without",
                ["registration", "Register", "Verify", "x probes no panel", "x no probes",
                 "outcome", "log10 p", "plain", "aligned"],
                [[label, r["register_s"], r["verify_s"], r["x_probes_no_panel"],
                  r["x_no_probes"], r["outcome"], r["log10_p_value"], r["tests"].get("plain"),
                  r["tests"].get("aligned")] for label, r in calls.items()])
    s = result["split"]
    print_table("(b) where Verify's time goes: parts measured alone (s)",
                ["sandbox start", "run: triggers", "run: +1,024 probes", "open panel",
                 "verdict plain", "verdict + panel", "aligned extra"],
                [[s["sandbox_start_s"], s["sandbox_run_triggers_s"],
                  s["sandbox_run_triggers_probes_s"], s["open_sealed_panel_s"],
                  s["verdict_plain_s"], s["verdict_panel_s"], s["aligned_extra_s"]]])
    print_table("(b) cProfile of the verdict with panel: most own time",
                ["function", "calls", "own s", "cumulative s"],
                [[f["function"], f["calls"], f["tottime_s"], f["cumtime_s"]]
                 for f in s["profile_top"]])
    print(f"aligned Verify / plain Verify (probes, no panel): {result['aligned_x_plain']:.2f} "
          f"(goal ≤ {GOAL_RATIO}); / Verify with a probe-less key: "
          f"{result['aligned_x_no_probes']:.2f}\n", flush=True)


# --- the run --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--workdir", type=Path, help="scratch space (default: a temp dir)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="freemark-bench-aligned-", dir=args.workdir))
    began = time.perf_counter()
    try:
        data = digits()
        triggers = select_triggers(data.x_train, data.y_train, per_class=10, seed=0)
        rows, wide = [], None
        bar = tqdm(total=len(plan.widths) * (2 + len(PANEL_SEEDS)), desc="(a) training",
                   unit="model", file=sys.stderr)
        widths = []
        for units in plan.widths:
            widths.append(build_width(data, triggers, units, plan, bar))
        bar.close()
        for width in tqdm(widths, desc="(a) alignment", unit="width", file=sys.stderr):
            rows.append(alignment_cost(width, plan))
            if width.units == plan.verify_width:
                wide = width
        print_alignment(rows)
        assert wide is not None, "the verify width must be one of the widths"
        verify = verify_through_server(wide, triggers, work, plan)
        print_verify(verify)
        elapsed = time.perf_counter() - began
        print(f"done in {elapsed:.0f} s", flush=True)
        if args.json:
            write_json(args.json, {"plan": dataclasses.asdict(plan), "alignment": rows,
                                   "verify": verify, "elapsed_s": elapsed})
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
