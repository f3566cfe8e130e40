"""The black-box experiment on a real pretrained host (ccexam's MNISTNet): derivation time per
256 queries, every theft, student and held-out independent under each output statistic, and
the calibration on held-out independents. Writes docs/blackbox.json and prints the tables
docs/blackbox.md quotes. Models and the key are cached by recipe hash under .cache/blackbox/.

    PYTHONPATH=client:keyserver:lab .venv/bin/python bench/blackbox.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from freemark_lab.blackbox import QUICK, RECIPE, run

ROOT = Path(__file__).resolve().parents[1]
STATS = ("labels", "scores", "ranking", "combined (scores endpoint)")


def render(report: dict) -> str:
    """The tables: worst set's log10 p per model and statistic, then the calibration."""
    lines = [(f"derivation: {report['derivation_seconds']:.0f} s for "
             f"{report['recipe']['sets']} sets of {report['recipe']['queries']} queries "
             f"({report['derivation_seconds_per_256_queries']:.0f} s per 256 queries)"), "",
             "| model | kind | test acc | " + " | ".join(f"log10 p {s}" for s in STATS) + " |",
             "|---|---|--:|" + "--:|" * len(STATS)]
    for row in report["rows"]:
        worst = row["log10_p_worst_set"]
        arch = f" ({row['architecture']})" if row["architecture"] else ""
        lines.append(f"| {row['model']}{arch} | {row['kind']} | {row['accuracy']:.4f} | "
                     + " | ".join(f"{worst[s]:.1f}" for s in STATS) + " |")
    students = [r for r in report["rows"] if r["training"]]
    if students:
        lines += ["", "| student | epochs run | best epoch | thief's held-out acc | test acc |",
                  "|---|--:|--:|--:|--:|"]
        lines += [f"| {r['model']} | {r['training']['epochs_run']} (cap "
                  f"{r['training']['cap']}) | {r['training']['best_epoch']} | "
                  f"{r['training']['held_out_accuracy']} | {r['accuracy']:.4f} |"
                  for r in students]
    calibration = report["calibration"]
    lines += ["", ("calibration: held-out independents' p-values, per (model, full set) pair "
                   f"(and per (model, {calibration['blocks']['block']}-query block) pair, "
                   "labels)"), "",
              ("| statistic | pairs | fraction < 1e-3 | min log10 p | mean p | KS D (p) | "
               "KS D+ above uniform (p) |"), "|---|--:|--:|--:|--:|--:|--:|"]
    for stat, c in calibration.items():
        name = "labels, blocks" if stat == "blocks" else stat
        lines.append(f"| {name} | {c['pairs']} | {c['fraction_below_1e-3']:.4f} | "
                     f"{c['min_log10_p']:.2f} | {c['mean_p']:.3f} | "
                     f"{c['ks_uniform_statistic']:.3f} ({c['ks_uniform_p']:.2g}) | "
                     f"{c['ks_above_uniform_statistic']:.3f} ({c['ks_above_uniform_p']:.2g}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(ROOT / "docs" / "blackbox.json"))
    parser.add_argument("--quick", action="store_true",
                        help="64-query sets and smaller budgets (what fits a shared 2-core "
                             "machine in minutes); the default is the issue's 256-query run")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else RECIPE)
    Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
