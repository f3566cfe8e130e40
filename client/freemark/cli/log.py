"""`freemark log ...`: read the TTP's log and monitor it from outside.

`receipt status` reads a registration's state (active, or revoked: when, by whom, why) from
the whole log, every entry's statement signature and the signed root checked. `log entries` prints entries by index range, with their signatures, so anyone can recompute the tree the checkpoints
sign; `log monitor` is `freemark.audit.monitor` with a state file: exit 0 when the log only grew
since the last run, 1 with one `ALARM` line on a fork, a shrink, another origin, a bad
signature, time going backwards, entries that do not make the signed root or an entry
without the TTP's statement signature, 2 on any other
error (the server unreachable, a bad argument). The state is replaced only after a clean run.

The parsers are added to the `freemark` command by `freemark.cli.app` (`log`) and by
`freemark.cli.receipts` (`receipt status`).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from freemark.audit.monitor import check_log, load_state, save_state, verify_entries
from freemark.audit.receipt import load_statement, verify_receipt
from freemark.audit.registry import LogRegistry, RegistrationState
from freemark.cli.common import Subparsers, add_connection, add_origin, client
from freemark.cli.display import print_fields, print_json, print_rows
from freemark.errors import InvalidInputError, InvalidReceiptError, LogProofError
from freemark.records.types import Receipt, SignedStatement
from freemark.rpc import KeyServiceClient
from freemark.tlog import merkle
from freemark.tlog.signatures import Verifier

__all__ = ["add_log_parser", "add_status_parser", "load_verifier", "receipt_status"]

def load_verifier(path: str) -> Verifier:
    """The TTP's public key from a PEM file, as an input error if unusable."""
    try:
        return Verifier.from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise InvalidInputError(f"public key {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidInputError(f"public key {path} is not an Ed25519 PEM key") from exc


def _entry_json(index: int, entry: SignedStatement) -> dict[str, Any]:
    try:
        body: Any = json.loads(entry.body)
    except ValueError:
        body = None
    return {"index": index, "leaf_hash": merkle.leaf_hash(entry.body).hex(), "body": body,
            "body_b64": base64.b64encode(entry.body).decode("ascii"), "key_id": entry.key_id,
            "signature_b64": base64.b64encode(entry.signature).decode("ascii")}


def _cmd_entries(args: argparse.Namespace) -> int:
    if args.start < 0 or args.end <= args.start:
        raise InvalidInputError("give --start >= 0 and --end above it")
    with client(args) as ttp:
        end = min(args.end, ttp.get_checkpoint().tree_size)  # up to the log's end
        entries = ttp.get_entries(args.start, end) if end > args.start else []
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


def _cmd_monitor(args: argparse.Namespace) -> int:
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


def receipt_status(ttp: KeyServiceClient, receipt: Receipt, verifier: Verifier,
                   origin: str | None) -> tuple[RegistrationState, merkle.TreeHead]:
    """A receipt's registration as the whole log says it is now, or raise.

    The latest checkpoint must be signed (under `origin`, if pinned), every entry up to it
    must carry the TTP's statement signature and make its root, and the receipt's own body
    must be the entry at its index; then the
    registration's state (and its first revocation) is read from those entries alone.
    """
    head = merkle.open_checkpoint(ttp.get_checkpoint().note, verifier, origin)
    entries = ttp.get_entries(0, head.tree_size)
    if verify_entries(entries, 0, merkle.Frontier(), verifier).root() != head.root_hash:
        raise LogProofError("the entries served do not make the signed root: the log serves "
                            "other entries than it signs")
    registry = LogRegistry()
    registry.extend((entry.body for entry in entries), 0)
    if (receipt.log_index >= head.tree_size
            or entries[receipt.log_index].body != receipt.statement.body):
        raise LogProofError(f"the log's entry {receipt.log_index} is not this receipt: "
                            "the log forked, or the receipt is from another log")
    state = registry.get(receipt.registration_id)
    assert state is not None  # its own entry registers it
    return state, head


def _cmd_status(args: argparse.Namespace) -> int:
    pem = _read(args.public_key)
    statement = load_statement(args.file)
    if not isinstance(statement, Receipt):
        raise InvalidInputError(f"{args.file} is not a receipt: status is a registration's")
    try:
        verify_receipt(statement, pem, origin=args.origin)
        with client(args) as ttp:
            state, head = receipt_status(ttp, statement, Verifier.from_pem(pem), args.origin)
    except (InvalidReceiptError, LogProofError) as exc:
        print(f"freemark: FAILED: {args.file}: {exc}", file=sys.stderr)
        return 1
    revocation = state.revocation
    status = "active" if revocation is None else "revoked"
    shown = {"registration_id": state.registration_id, "owner": state.owner, "status": status,
             "tree_size": head.tree_size, "checkpoint_time": head.timestamp,
             "revoked_at": None if revocation is None else revocation.integrated_time,
             "revoked_by": None if revocation is None else revocation.revoked_by,
             "reason": None if revocation is None else revocation.reason,
             "revocation_log_index": None if revocation is None else revocation.log_index}
    if args.json:
        print_json(shown)
    else:
        print_fields(f"{status.upper()}: {state.registration_id}, from a log of "
                     f"{head.tree_size} entries checked against its signed root", shown)
    return 0


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: {exc.strerror or exc}") from exc


def add_status_parser(receipts: Subparsers) -> None:
    """`freemark receipt status RECEIPT`: active or revoked, as the log says."""
    q = receipts.add_parser("status", help="is a registration active or revoked? read from the "
                            "log's entries, each one's signature and their signed root checked; "
                            "exit 1 if the receipt or the log does not check out")
    q.add_argument("file", help="receipt JSON, as register --json prints it")
    q.add_argument("--public-key", required=True,
                   help="the key server's public key PEM, obtained out of band")
    add_origin(q)
    add_connection(q)
    q.set_defaults(handler=_cmd_status)


def add_log_parser(subparsers: Subparsers) -> None:
    """`freemark log entries|monitor`, with the CLI's connection and origin flags."""
    p = subparsers.add_parser("log", help="read the key server's log and monitor it")
    log = p.add_subparsers(dest="action", required=True)
    q = log.add_parser("entries", help="print log entries [start, end)")
    q.add_argument("--start", type=int, required=True, help="first index")
    q.add_argument("--end", type=int, required=True, help="one past the last index")
    add_connection(q)
    q.set_defaults(handler=_cmd_entries)
    q = log.add_parser("monitor", help="check that the log only grew since the last run; "
                       "exit 1 on a fork, shrink, wrong origin, bad signature, time going "
                       "backwards or an entry without the TTP's statement signature")
    q.add_argument("--state", required=True, help="JSON file remembering the last checkpoint "
                   "(created on the first run, replaced atomically after each clean one)")
    q.add_argument("--public-key", required=True,
                   help="the key server's public key PEM, obtained out of band")
    add_origin(q)
    add_connection(q)
    q.set_defaults(handler=_cmd_monitor)
