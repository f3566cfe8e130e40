"""Rendering a robustness `Report`: a terminal table, a JSON document and a PNG plot.

p-values are shown as log10 (−41.5 means 10^−41.5): the interesting ones underflow any
fixed-point column, and the threshold α = 1e-9 is simply −9. Every suspect (attacked copy
or null model) gets the library's three figures: the plain test, the aligned test
(matched host units T of M live ones, and its p) and the combined decision (Bonferroni
over both, with its outcome), plus the plain test without the panel, which is what a key
alone gives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from freemark.records.types import VerdictTest
from freemark.verdict.decision import Verdict
from freemark_lab.attacks.overwrite import OverwriteResult
from freemark_lab.robustness import AttackRow, NullRow, Report, find_test

STATUS_COLOURS = {"detected": "#1a9850", "removed": "#d73027", "destroys the model": "#878787"}
NULL_COLOURS = {True: "#4575b4", False: "#984ea3"}
ALIGNED_COLOUR = "#fdae61"
X_TICKS = (-20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):  # combine steps
        return " → ".join(_params(step) for step in value)
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _params(params: Mapping[str, Any]) -> str:
    kind = params.get("kind")
    body = ", ".join(f"{k}={_short(v)}" for k, v in params.items() if k not in {"kind", "steps"})
    if "steps" in params:
        body = _short(params["steps"])
    return f"{kind}({body})" if kind else body


def _log10(verdict: Verdict | None, binomial: bool = False) -> str:
    if verdict is None:
        return "n/a"
    return f"{verdict.log10_p_value_binomial if binomial else verdict.log10_p_value:.1f}"


def _grid(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _test_log10(test: VerdictTest | None) -> str:
    return "n/a" if test is None else f"{test.log10_p_value:.1f}"


def _aligned_units(test: VerdictTest | None) -> str:
    return "n/a" if test is None else f"{test.statistic:.0f}/{test.n}"


def _verdict_cells(verdict: Verdict | None, alone: Verdict | None) -> list[str]:
    """BER, plain without panel, plain, aligned T/M, aligned, combined log10 p, outcome."""
    return ["n/a" if verdict is None else f"{verdict.ber:.3f}", _log10(alone),
            _test_log10(find_test(verdict, "plain")), _aligned_units(find_test(verdict, "aligned")),
            _test_log10(find_test(verdict, "aligned")), _log10(verdict),
            "n/a" if verdict is None else verdict.outcome]


VERDICT_COLUMNS = ["BER", "plain alone", "plain", "aligned T/M", "aligned", "combined", "outcome"]


def _attack_cells(row: AttackRow) -> list[str]:
    return [row.attack, _params(row.params), f"{row.accuracy_before:.3f}", f"{row.accuracy_after:.3f}",
            f"{-row.accuracy_drop:+.3f}", *_verdict_cells(row.verdict, row.plain_alone),
            row.status, f"{row.seconds:.1f}"]


def _null_cells(null: NullRow) -> list[str]:
    v = null.verdict
    decision = v.outcome
    if v.is_match and null.independent:
        decision = "FALSE POSITIVE"
    cells = _verdict_cells(v, null.plain_alone)
    return [null.label, str(null.seed), f"{null.accuracy:.3f}", *cells[:-1], decision]


def _overwrite_lines(result: OverwriteResult) -> list[str]:
    rows = [[c.key, c.model, "n/a" if c.verdict is None else f"{c.verdict.ber:.3f}", _log10(c.verdict),
             "match" if c.verdict is not None and c.verdict.is_match else "no match"]
            for c in result.checks]
    lines = ["", "Ambiguity: the thief derives his own key on a fine-tuned stolen copy",
             *_grid(["key", "model", "BER", "log10 p", "decision"], rows),
             f"thief's registration: {result.attacker_registration}",
             f"dispute over the thief's copy goes to: {result.owner_of_copy}",
             f"dispute over the original goes to:    {result.owner_of_original}"]
    return lines + [f"note: {n}" for n in result.notes]


def _panel_line(report: Report) -> str:
    if not report.panel_label:
        return ("reference panel: none, so only the plain test ran (relabelling, rescaling and "
                "dummy units are not tested)")
    return (f"reference panel: {len(report.panel_seeds)} × {report.panel_label} (seeds "
            f"{', '.join(map(str, report.panel_seeds))}; disjoint from the null models below); "
            f"their matched host units: {', '.join(map(str, report.panel_counts))} of "
            f"{report.host_units}")


def render_text(report: Report) -> str:
    """The whole report as a plain-text table (what the terminal and the .txt file show)."""
    hv, alone = report.host_verdict, report.host_plain_alone
    counts = {s: sum(r.status == s for r in report.rows) for s in STATUS_COLOURS}
    fp = report.false_positives
    independent = sum(n.independent for n in report.nulls)
    host_aligned = find_test(hv, "aligned")
    lines = [
        f"robustness report: {report.name} ({'quick' if report.quick else 'full'} run)",
        (f"key layer {report.layer!r}: {report.units} units, N = {report.n_bits} bits, "
        f"α = {report.alpha:g} (log10 {math.log10(report.alpha):.0f}), "
        f"'destroys the model' = accuracy drop > {report.destroy_bound:g}"),
        (f"host: test accuracy {report.host_accuracy:.3f}, BER {hv.ber:.3f}, combined log10 p "
        f"{hv.log10_p_value:.1f} ({hv.outcome}; plain {_test_log10(find_test(hv, 'plain'))}, "
        f"aligned {_aligned_units(host_aligned)} units, {_test_log10(host_aligned)}); "
        f"plain without the panel {_log10(alone)}"),
        _panel_line(report),
        (f"attacks: {counts['detected']} detected, {counts['removed']} removed, "
        f"{counts['destroys the model']} destroy the model; independent held-out nulls: "
        f"{len(fp)} false positive(s) of {independent}"),
        ("columns: log10 p of the plain test without the panel ('plain alone'), of the plain "
         "test, of the aligned test (T of M live host units matched at |r| >= 0.9) and "
         "combined (Bonferroni); the outcome and status follow the combined verdict"),
        "",
        *_grid(["attack", "params", "acc before", "acc after", "Δacc", *VERDICT_COLUMNS,
                "status", "s"], [_attack_cells(r) for r in report.rows]),
        "", ("Held-out null models (never in the panel; independent ones must not match, "
             "related ones share the host's lineage)"),
        *_grid(["model", "seed", "acc", *VERDICT_COLUMNS[:-1], "decision"],
               [_null_cells(n) for n in report.nulls]),
    ]
    if report.overwrite is not None:
        lines += _overwrite_lines(report.overwrite)
    if report.notes:
        lines += ["", *(f"note: {n}" for n in report.notes)]
    lines += ["", f"{report.seconds:.0f} s on {report.threads} thread(s)"]
    return "\n".join(lines) + "\n"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _verdict_json(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {k: _finite(v) if isinstance(v, float) else v for k, v in verdict.as_dict().items()}


def _summary_json(verdict: Verdict | None, alone: Verdict | None) -> dict[str, Any]:
    """The three figures of a suspect, flat (the verdicts themselves carry the methods)."""
    plain, aligned = find_test(verdict, "plain"), find_test(verdict, "aligned")
    return {
        "outcome": None if verdict is None else verdict.outcome,
        "combined_log10_p": None if verdict is None else _finite(verdict.log10_p_value),
        "plain_log10_p": None if plain is None else _finite(plain.log10_p_value),
        "aligned_log10_p": None if aligned is None else _finite(aligned.log10_p_value),
        "aligned_matched_units": None if aligned is None else int(aligned.statistic),
        "aligned_host_units": None if aligned is None else aligned.n,
        "plain_alone_log10_p": None if alone is None else _finite(alone.log10_p_value),
    }


def to_json(report: Report) -> dict[str, Any]:
    """The report as one JSON-ready dict (no NaN or infinity: those become null)."""
    overwrite = None
    if report.overwrite is not None:
        o = report.overwrite
        overwrite = {"checks": [{"key": c.key, "model": c.model, "verdict": _verdict_json(c.verdict)}
                                for c in o.checks],
                     "attacker_registration": o.attacker_registration,
                     "owner_of_copy": o.owner_of_copy, "owner_of_original": o.owner_of_original,
                     "notes": list(o.notes)}
    return {
        "name": report.name, "task": report.task, "layer": report.layer, "units": report.units,
        "n_bits": report.n_bits, "alpha": report.alpha, "destroy_bound": report.destroy_bound,
        "quick": report.quick, "host_accuracy": report.host_accuracy,
        "host_verdict": _verdict_json(report.host_verdict),
        "host_plain_alone": _verdict_json(report.host_plain_alone),
        "host_summary": _summary_json(report.host_verdict, report.host_plain_alone),
        "panel": {"label": report.panel_label, "seeds": list(report.panel_seeds),
                  "matched_units": list(report.panel_counts), "host_units": report.host_units,
                  "digest": report.host_verdict.panel.sha256.hex() if report.panel_label else None},
        "attacks": [{"attack": r.attack, "kind": r.kind, "params": dict(r.params),
                     "accuracy_before": r.accuracy_before, "accuracy_after": r.accuracy_after,
                     "verdict": _verdict_json(r.verdict), "status": r.status,
                     "seconds": r.seconds, "function_preserving": r.function_preserving,
                     "plain_alone": _verdict_json(r.plain_alone),
                     **_summary_json(r.verdict, r.plain_alone), "note": r.note} for r in report.rows],
        "nulls": [{"label": n.label, "seed": n.seed, "independent": n.independent,
                   "accuracy": n.accuracy, "verdict": _verdict_json(n.verdict),
                   "plain_alone": _verdict_json(n.plain_alone),
                   **_summary_json(n.verdict, n.plain_alone)} for n in report.nulls],
        "false_positives": len(report.false_positives),
        "overwrite": overwrite, "notes": list(report.notes), "seconds": report.seconds, "threads": report.threads,
        "config": report.config,
    }


def _strength(verdict: Verdict | None) -> float:
    return 0.0 if verdict is None else -verdict.log10_p_value


def plot(report: Report, path: str | Path) -> None:
    """Accuracy drop vs −log10 p: one numbered point per attack (the combined verdict, with
    the aligned test and the plain test without the panel as open markers), the held-out
    null models apart, the α line.

    The x axis is symmetric-log (linear within ±1 point) because most attacks cost no
    accuracy and would otherwise pile up at 0; the numbers refer to the key on the right.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax, key) = plt.subplots(1, 2, figsize=(13, 7), dpi=100,
                                  gridspec_kw={"width_ratios": [2.6, 1]})
    number = {id(r): i + 1 for i, r in enumerate(report.rows)}
    for status, colour in STATUS_COLOURS.items():
        rows = [r for r in report.rows if r.status == status]
        if not rows:
            continue
        ax.scatter([100 * r.accuracy_drop for r in rows], [_strength(r.verdict) for r in rows],
                   s=46, color=colour, edgecolor="black", linewidth=0.5, zorder=3,
                   label=f"attack: {status} ({len(rows)})")
        for r in rows:
            ax.annotate(str(number[id(r)]), (100 * r.accuracy_drop, _strength(r.verdict)),
                        fontsize=7, xytext=(4, 2), textcoords="offset points", color="#333333")
    for independent, colour in NULL_COLOURS.items():
        nulls = [n for n in report.nulls if n.independent == independent]
        if nulls:
            ax.scatter([100 * (report.host_accuracy - n.accuracy) for n in nulls],
                       [_strength(n.verdict) for n in nulls], marker="^" if independent else "v",
                       s=40, color=colour, edgecolor="black", linewidth=0.5, zorder=2,
                       label=("independent" if independent else "related") + f" null models ({len(nulls)})")
    aligned = [(r, t) for r in report.rows for t in [r.test("aligned")] if t is not None]
    if aligned:
        ax.scatter([100 * r.accuracy_drop for r, _ in aligned], [-t.log10_p_value for _, t in aligned],
                   marker="D", s=40, facecolor="none", edgecolor=ALIGNED_COLOUR, linewidth=1.4,
                   zorder=4, label="attack: aligned test alone")
    alone = [r for r in report.rows if r.plain_alone is not None and report.panel_label]
    if alone:
        ax.scatter([100 * r.accuracy_drop for r in alone], [_strength(r.plain_alone) for r in alone],
                   marker="o", s=22, facecolor="none", edgecolor="#555555", linewidth=0.8,
                   zorder=2, label="attack: plain test without the panel")
    threshold = -math.log10(report.alpha)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"decision threshold −log10 α = {threshold:g}")
    ax.axvline(100 * report.destroy_bound, color="#878787", linestyle=":", linewidth=1,
               label=f"'destroys the model' bound ({100 * report.destroy_bound:g} points)")
    ax.set_xscale("symlog", linthresh=1.0)
    low, high = ax.get_xlim()
    ax.set_xlim(min(low, -1.0), max(high, 100 * report.destroy_bound + 1.0))
    ax.set_xticks([t for t in X_TICKS if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("test accuracy drop (percentage points, symmetric log scale)")
    ax.set_ylabel("−log10 p, combined verdict unless marked (higher = stronger evidence)")
    ax.set_title(f"freemark robustness: {report.name} — key layer {report.layer} "
                 f"({report.units} units, N = {report.n_bits})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    key.axis("off")
    step = min(0.034, 0.95 / max(1, len(report.rows)))
    for i, r in enumerate(report.rows):
        key.text(0.0, 0.98 - i * step, f"{i + 1:>2}  {r.attack}", fontsize=7.5, va="top",
                 color=STATUS_COLOURS[r.status], family="monospace", transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: Report, out_dir: str | Path, *, stem: str | None = None) -> dict[str, Path]:
    """Write `<stem>.txt`, `<stem>.json` and `<stem>.png` into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or report.name
    paths = {"txt": out / f"{stem}.txt", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["txt"].write_text(render_text(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    plot(report, paths["png"])
    return paths
