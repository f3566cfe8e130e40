"""The full robustness run: digits CNN, MNIST CNN and MiniLM, each from the lab's built-in
config <name> (lab/freemark_lab/configs/<name>.toml).

Writes docs/robustness/<name>.txt, .json and .png (the committed evidence that
docs/robustness.md summarises) and prints each report. About 15-25 minutes on two
shared CPU cores; `--only digits` for one model, `--quick` for a smoke run.

    PYTHONPATH=client:keyserver:lab .venv/bin/python bench/robustness.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from freemark_lab import report as render
from freemark_lab.configs import config_path
from freemark_lab.robustness import load_config, run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("digits", "mnist", "minilm")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=CONFIGS,
                        help="run only this model (repeatable); default: all three")
    parser.add_argument("--out", default=str(ROOT / "docs" / "robustness"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="each config's quick variant")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    false_positives = 0
    for name in args.only or CONFIGS:
        report = run(load_config(config_path(name), quick=args.quick))
        paths = render.write(report, args.out)
        print(render.render_text(report))
        print("written: " + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                                      for p in paths.values()), flush=True)
        false_positives += len(report.false_positives)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if false_positives else 0


if __name__ == "__main__":
    sys.exit(main())
