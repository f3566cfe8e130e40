"""`freemark log ...`: read the TTP's log and monitor it from outside.

`log entries` prints entries by index range, so anyone can recompute the tree the checkpoints
sign; `log monitor` is `freemark.monitor` with a state file: exit 0 when the log only grew
since the last run, 1 with one `ALARM` line on a fork, a shrink, another origin, a bad
signature, time going backwards or entries that do not make the signed root, 2 on any other
error (the server unreachable, a bad argument). The state is replaced only after a clean run.

The parsers are added to the `freemark` command by `freemark.cli`, which passes the helpers
that read the connection flags (this module does not import the CLI, to avoid a cycle).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from freemark import merkle
from freemark.display import print_fields, print_json, print_rows
from freemark.errors import InvalidInputError, LogProofError
from freemark.monitor import check_log, load_state, save_state
from freemark.rpc import KeyServiceClient
from freemark.signatures import Verifier

__all__ = ["add_log_parser", "load_verifier"]

Client = Callable[[argparse.Namespace], KeyServiceClient]


def load_verifier(path: str) -> Verifier:
    """The TTP's public key from a PEM file, as an input error if unusable."""
    try:
        return Verifier.from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise InvalidInputError(f"public key {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidInputError(f"public key {path} is not an Ed25519 PEM key") from exc


def _entry_json(index: int, entry: bytes) -> dict[str, Any]:
    try:
        body: Any = json.loads(entry)
    except ValueError:
        body = None
    return {"index": index, "leaf_hash": merkle.leaf_hash(entry).hex(), "body": body,
            "body_b64": base64.b64encode(entry).decode("ascii")}


def _cmd_entries(args: argparse.Namespace, client: Client) -> int:
    if args.start < 0 or args.end <= args.start:
        raise InvalidInputError("give --start >= 0 and --end above it")
    with client(args) as ttp:
        entries = ttp.get_entries(args.start, args.end)
    shown = [_entry_json(args.start + i, e) for i, e in enumerate(entries)]
    if args.json:
        print_json({"start": args.start, "end": args.start + len(entries), "entries": shown})
        return 0
    rows = []
    for item in shown:
        body = item["body"] if isinstance(item["body"], dict) else {}
        rows.append([item["index"], body.get("kind", "?"), body.get("registration_id", ""),
                     item["leaf_hash"][:16]])
    print_rows(["index", "kind", "registration_id", "leaf_hash"], rows)
    return 0


def _cmd_monitor(args: argparse.Namespace, client: Client) -> int:
    verifier = load_verifier(args.public_key)
    previous = load_state(args.state)
    try:
        with client(args) as ttp:
            state, report = check_log(ttp, verifier, previous, origin=args.origin)
    except LogProofError as exc:
        if args.json:
            print_json({"ok": False, "alarm": str(exc), "state": args.state})
        print(f"freemark: ALARM: {exc}", file=sys.stderr)
        return 1
    save_state(args.state, state)
    if args.json:
        print_json({**report.as_dict(), "state": args.state})
    else:
        was = "first run" if report.old_size is None else f"was {report.old_size}"
        print_fields(f"OK log {report.origin}: {report.new_size} entries ({was}), consistent",
                     {"root_hash": report.root_hash, "time": report.timestamp,
                      "entries verified this run": report.entries_verified,
                      "every entry verified": report.entries_checked, "state": args.state})
    return 0


def add_log_parser(subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
                   connection: Callable[[argparse.ArgumentParser], None],
                   origin: Callable[[argparse.ArgumentParser], None], client: Client) -> None:
    """`freemark log entries|monitor`, with the CLI's connection and origin flags."""
    p = subparsers.add_parser("log", help="read the key server's log and monitor it")
    log = p.add_subparsers(dest="action", required=True)
    q = log.add_parser("entries", help="print log entries [start, end)")
    q.add_argument("--start", type=int, required=True, help="first index")
    q.add_argument("--end", type=int, required=True, help="one past the last index")
    connection(q)
    q.set_defaults(handler=lambda args: _cmd_entries(args, client))
    q = log.add_parser("monitor", help="check that the log only grew since the last run; "
                       "exit 1 on a fork, shrink, wrong origin, bad signature or time going "
                       "backwards")
    q.add_argument("--state", required=True, help="JSON file remembering the last checkpoint "
                   "(created on the first run, replaced atomically after each clean one)")
    q.add_argument("--public-key", required=True,
                   help="the key server's public key PEM, obtained out of band")
    origin(q)
    connection(q)
    q.set_defaults(handler=lambda args: _cmd_monitor(args, client))
