"""`freemark attack`: run a robustness suite from a TOML config and write its report.

A subcommand of the `freemark` CLI, found through the `freemark.commands` entry point this
distribution declares (`add_attack_parser`), and runnable as `python -m
freemark_lab.attack_cli --config quick`, which is the same command. `--config` takes a TOML file
or the name of a built-in suite (freemark_lab/configs/: digits, minilm, mnist, quick).
Exit status: 0, or 1 when an independent null model was matched (a false positive, which
would make every verdict of that key worthless), or 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from freemark_lab.configs import BUILTIN, config_path

DEFAULT_OUT = "out/robustness"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="TOML run configuration, or a built-in suite: " + ", ".join(BUILTIN))
    parser.add_argument("--quick", action="store_true",
                        help="only the attacks marked quick, with the config's [quick] overrides")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for <name>.txt/.json/.png (default {DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def add_attack_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `attack` subcommand on the `freemark` CLI's subparsers."""
    parser = subparsers.add_parser("attack", help="run the robustness suite (attacks, nulls, report)",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(handler=run_attack)


def run_attack(args: argparse.Namespace) -> int:
    """Run the configured suite, write the report files, print the table (or JSON)."""
    from freemark_lab import report as render  # matplotlib and torch load only when used
    from freemark_lab.robustness import load_config, run

    config = load_config(config_path(args.config), quick=args.quick)
    report = run(config, progress=not args.json)
    paths = render.write(report, args.out)
    if args.json:
        print(json.dumps(render.to_json(report), ensure_ascii=False))
    else:
        print(render.render_text(report), end="")
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 1 if report.false_positives else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (`python -m freemark_lab.attack_cli ...`): `freemark attack ...`."""
    from freemark.cli import main as freemark

    return freemark(["attack", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
