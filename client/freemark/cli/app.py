"""The `freemark` command: build triggers, derive keys, extract and judge, talk to the TTP.

Every subcommand prints a readable table, or one JSON object with `--json`. Errors are
one line on stderr and exit status 2; nothing prints a traceback for a bad input.
`freemark receipt verify` exits 1 when a receipt or verdict fails verification.

The commands that talk to the key server take `--server HOST:PORT` and `--token T`, which
default to the FREEMARK_SERVER and FREEMARK_TOKEN environment variables (prefer the
variable for the token: command lines are visible to other users of the machine).

One module per command group (`scheme`, `ttp`, `receipts`, `log`); more commands come from
installed distributions through the `freemark.commands` entry-point group (the robustness
lab declares `attack` there), so the library imports no plugin by name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from freemark.cli import log, receipts, scheme, ttp
from freemark.cli.common import Subparsers
from freemark.errors import FreemarkError, InvalidInputError

__all__ = ["PLUGIN_GROUP", "build_parser", "main"]

# Entry points in this group are `name = "module:function"`; the function adds the `name`
# subcommand to the `freemark` command's subparsers.
PLUGIN_GROUP = "freemark.commands"
# What a person needs when a known plugin is missing.
INSTALL_HINTS = {"attack": "the robustness lab is not installed; `freemark attack` needs it: "
                           "pip install 'freemark[lab]'"}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(prog="freemark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    scheme.add_parsers(sub)
    ttp.add_parsers(sub)
    receipts.add_parsers(sub)
    log.add_log_parser(sub)
    _add_plugins(sub)
    return parser


def _add_plugins(sub: Subparsers) -> None:
    """Every installed `freemark.commands` entry point; a known one that is absent or does
    not load (a broken install) becomes a stub that says how to install it."""
    added = set()
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()(sub)
        except ImportError:
            continue
        added.add(point.name)
    for name, hint in INSTALL_HINTS.items():
        if name not in added:
            _add_missing(sub, name, hint)


def _add_missing(sub: Subparsers, name: str, hint: str) -> None:
    # No option prefix: every argument, `--config` and `-h` included, lands in `rest`, so
    # any invocation reaches the handler's one-line message.
    p = sub.add_parser(name, help=f"(not installed) {hint.split(';')[0]}", add_help=False,
                       prefix_chars="\0")
    p.add_argument("rest", nargs="*")

    def missing(args: argparse.Namespace) -> int:
        raise InvalidInputError(hint)

    p.set_defaults(handler=missing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `freemark` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FreemarkError as exc:
        print(f"freemark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freemark: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
