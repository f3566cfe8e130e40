"""`freemark receipt verify|status`: checking receipts and verdicts offline (status reads
the log)."""

from __future__ import annotations

import argparse
import json
import sys

from freemark.audit.receipt import load_statement, verify_in_log, verify_receipt, verify_suspect
from freemark.cli import log
from freemark.cli.common import Subparsers, add_json, add_origin, read_file, signed_rows
from freemark.cli.display import print_fields, print_json
from freemark.errors import InvalidInputError, InvalidReceiptError, VerificationFailedError
from freemark.formats.local import load_model, upload_file
from freemark.formats.pt2 import fingerprint
from freemark.records.schema import to_json_fields
from freemark.records.types import (
    AnyEndpointVerdict,
    AnyVerdict,
    Checkpoint,
    CoarseEndpointVerdict,
    CoarseVerdict,
    ConsistencyProof,
    EndpointVerdict,
    Receipt,
    Revocation,
    SignedVerdict,
)
from freemark.records.wire import checkpoint_from_json, consistency_from_json

__all__ = ["add_parsers"]


def _load_log_state(path: str) -> Checkpoint | ConsistencyProof:
    """A checkpoint JSON, or a consistency proof JSON ending in the checkpoint to trust."""
    try:
        data = json.loads(read_file(path, "checkpoint"))
    except ValueError as exc:
        raise InvalidReceiptError(f"{path} is not JSON ({exc})") from None
    if isinstance(data, dict) and "old_size" in data:
        return consistency_from_json(data)
    return checkpoint_from_json(data)


def _check_model(statement: Receipt | AnyVerdict | Revocation | AnyEndpointVerdict, path: str,
                 adapter: str | None = None) -> None:
    """`--model`: a verdict's suspect by SHA-256 and size (a checkpoint directory as packed for
    the upload, with `adapter` the base and adapter packed together), a receipt's host by
    weights."""
    if isinstance(statement, Revocation):
        raise InvalidInputError("--model is for receipts and verdicts; a revocation names a "
                                "registration, not a file")
    if isinstance(statement, (EndpointVerdict, CoarseEndpointVerdict)):
        raise InvalidInputError("--model is for receipts and file verdicts; an endpoint "
                                "verdict binds the endpoint's answers, not a file")
    if isinstance(statement, Receipt):
        if adapter is not None:
            raise InvalidInputError("--adapter is for verdicts; a host is registered whole")
        fingerprint_of = fingerprint(load_model(path))
        if fingerprint_of != statement.host_fingerprint:
            raise VerificationFailedError(
                f"{path} is not the model this receipt registers: its weight fingerprint is "
                f"{fingerprint_of.hex()}, the receipt's {statement.host_fingerprint.hex()}")
        return
    with upload_file(path, adapter=adapter) as sent:  # a directory: the packed file sent
        verify_suspect(statement, sent)


_KINDS = {Receipt: "receipt", SignedVerdict: "verdict", CoarseVerdict: "coarse verdict",
          Revocation: "revocation", EndpointVerdict: "endpoint verdict",
          CoarseEndpointVerdict: "coarse endpoint verdict"}


# What a reader looks for first in a statement's table.
_FIRST = ("registration_id", "outcome", "alpha", "p_value", "p_value_above", "endpoint",
          "model_name", "model_version", "query_set", "suspect_sha256", "suspect_size",
          "reading", "requested_by", "integrated_time", "owner", "host_fingerprint")


def _cmd_receipt_verify(args: argparse.Namespace) -> int:
    pem = read_file(args.public_key, "public key")
    checked = []
    try:
        statement = load_statement(args.file)
        verify_receipt(statement, pem, origin=args.origin)
        checked.append("signature, canonical body, log inclusion"
                       + (", verdict policy and decision"
                          if isinstance(statement, (SignedVerdict, CoarseVerdict,
                                                    EndpointVerdict, CoarseEndpointVerdict))
                          else "")
                       + (", panel members" if isinstance(statement, Receipt) else "")
                       + (", the endpoint conversation's time window and query count"
                          if isinstance(statement, (EndpointVerdict, CoarseEndpointVerdict))
                          else ""))
        if args.adapter is not None and args.model is None:
            raise InvalidInputError("--adapter needs its base: --model BASE_DIR")
        if args.model is not None:
            _check_model(statement, args.model, args.adapter)
            checked.append(f"it is about {args.model}")
        if args.checkpoint is not None:
            verify_in_log(statement, _load_log_state(args.checkpoint), pem, origin=args.origin)
            checked.append(f"it is in the log {args.checkpoint} signs")
    except InvalidReceiptError as exc:
        print(f"freemark: FAILED: {args.file}: {exc}", file=sys.stderr)
        return 1
    kind = _KINDS[type(statement)]
    if args.json:
        print_json({
            "ok": True, "kind": kind, **to_json_fields(statement),
            "tree_size": statement.inclusion.tree_size, "key_id": statement.statement.key_id,
            "model": args.model, "checkpoint": args.checkpoint,
        })
    else:
        rows = {"kind": kind, **signed_rows(statement, tuple(
            n for n in _FIRST if hasattr(statement, n))),
            "tree_size": statement.inclusion.tree_size, "key_id": statement.statement.key_id,
            "checked": "; ".join(checked)}
        print_fields(f"OK {kind} for {statement.registration_id}, signed by key "
                     f"{statement.statement.key_id}", rows)
    return 0



def add_parsers(sub: Subparsers) -> None:
    """`receipt verify` and `receipt status`."""
    p = sub.add_parser("receipt", help="check receipts and verdicts offline")
    receipts = p.add_subparsers(dest="action", required=True)
    q = receipts.add_parser("verify", help="verify a saved --json receipt or verdict; exit 1 "
                            "if any check fails")
    q.add_argument("file", help="receipt or verdict JSON, as register/verify --json print it")
    q.add_argument("--public-key", required=True,
                   help="the key server's public key PEM, obtained out of band")
    q.add_argument("--model", metavar="SUSPECT",
                   help="fail unless the verdict is about this file (SHA-256 and size), or the "
                        "receipt registers this .pt2 (weight fingerprint)")
    q.add_argument("--adapter", metavar="ADAPTER_DIR", help="with --model BASE_DIR: the verdict "
                   "is about this LoRA adapter and base, packed as verify packs them")
    q.add_argument("--checkpoint", metavar="LATEST.json",
                   help="fail unless the statement is in the log this checkpoint signs (a "
                        "checkpoint JSON of the same size, or a consistency proof JSON from the "
                        "statement's checkpoint to a later one)")
    add_origin(q)
    add_json(q)
    q.set_defaults(handler=_cmd_receipt_verify)
    log.add_status_parser(receipts)
