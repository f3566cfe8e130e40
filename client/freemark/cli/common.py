"""What every `freemark` command group shares: the connection and output flags, the client
they build, and how a signed record reads in a table."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freemark.cli.display import format_value
from freemark.errors import InvalidInputError
from freemark.records.schema import signed_fields
from freemark.records.types import (
    AnyVerdict,
    CoarseEndpointVerdict,
    CoarseVerdict,
    Decision,
    Receipt,
    ReferencePanel,
    RegistrationInfo,
    SuspectReading,
    VerdictPolicy,
)
from freemark.rpc import DEFAULT_TIMEOUT_S, KeyServiceClient

DEFAULT_SERVER = "127.0.0.1:50051"  # where `freemark-keyserver serve` listens by default

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a table")


def add_origin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--origin", default=os.environ.get("FREEMARK_ORIGIN"),
                        help="the log's origin, as `freemark public-key` shows it (env "
                             "FREEMARK_ORIGIN): checkpoints of any other log are refused")


def add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("FREEMARK_SERVER", DEFAULT_SERVER),
                        help="key server HOST:PORT (env FREEMARK_SERVER; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("FREEMARK_TOKEN"),
                        help="bearer token (env FREEMARK_TOKEN, preferred)")
    parser.add_argument("--tls-ca", help="PEM of the CA that signed the server's certificate")
    parser.add_argument("--client-cert", help="PEM client certificate for mTLS")
    parser.add_argument("--client-key", help="PEM client private key for mTLS")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext, even to a non-loopback server (token sent in clear)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="deadline of each call in seconds (default %(default)s)")
    add_json(parser)


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: {exc.strerror or exc}") from exc


def read_optional(path: str | None, what: str) -> bytes | None:
    return None if path is None else read_file(path, what)


def client(args: argparse.Namespace) -> KeyServiceClient:
    """A client from the connection flags: TLS unless loopback, or forced on/off by them."""
    tls = False if args.insecure else (True if args.tls_ca or args.client_cert else None)
    return KeyServiceClient(
        args.server,
        token=args.token or None,
        tls=tls,
        root_certificates=read_optional(args.tls_ca, "CA certificate"),
        client_cert=read_optional(args.client_cert, "client certificate"),
        client_key=read_optional(args.client_key, "client key"),
        timeout=args.timeout,
        progress=not args.json and sys.stderr.isatty(),
    )


def iso_time(micros: int) -> str:
    """Unix microseconds as ISO 8601 UTC, for people; `--json` keeps the integer."""
    return datetime.fromtimestamp(micros / 1e6, tz=UTC).isoformat(timespec="microseconds")


def headline(verdict: Decision) -> str:
    """The verdict's outcome in words, for the table's title."""
    return {"match": "WATERMARK PRESENT", "no_match": "watermark not found",
            "inconclusive": "INCONCLUSIVE (the reference panel cannot reach alpha)"}[verdict.outcome]


def signed_rows(record: Any, first: tuple[str, ...] = ()) -> dict[str, Any]:
    """A signed record's fields for a table, from its field list: `first` ones first, times
    in ISO 8601, each test and each panel member on its own row, the panel in one line."""
    names = [spec.name for spec in signed_fields(type(record))]
    rows: dict[str, Any] = {}
    for name in [*first, *(n for n in names if n not in first)]:
        value = getattr(record, name)
        if name == "integrated_time":
            rows[name] = iso_time(value)
        elif (isinstance(record, (CoarseVerdict, CoarseEndpointVerdict))
              and name in ("p_value", "p_value_above")):
            if name == "p_value":
                rows[name] = f"in ({record.p_value_above:g}, {record.p_value:g}] (coarse)"
        elif isinstance(value, ReferencePanel):
            rows[name] = (f"{value.size} reference models, sha256 {value.sha256.hex()}"
                          if value.size else "none")
        elif isinstance(value, SuspectReading):
            rows[name] = (f"{value.tensor} (by its name)" if value.located == "named" else
                          f"{value.tensor}, the strongest of {value.candidates} tensors the "
                          "key server's scan located"
                          + (f" (requested: {value.requested})" if value.requested else ""))
        elif isinstance(value, VerdictPolicy):
            rows[name] = (f"{value.describe()}, {value.arbiter_disclosure} verdicts for "
                          f"arbiters ({value.id})")
        elif name == "panel_members":
            for number, member in enumerate(value, start=1):
                source = (f"the operator's {member.member_id}" if member.member_id
                          else "the owner's")
                rows[f"panel member {number}"] = (
                    f"{source}, sha256 {member.fingerprint.hex()}, "
                    + (f"left out: {member.left_out}" if member.left_out else "sealed"))
        elif name == "panel_warning":
            if value:
                rows["panel warning"] = value
        elif name == "tests":
            for test in value:
                rows[f"test {test.name}"] = (
                    f"{test.statistic:g} of {test.n}, p={format_value(test.p_value)} "
                    f"({test.method})")
        else:
            rows[name] = value
    return rows


def receipt_fields(receipt: Receipt) -> dict[str, Any]:
    return {
        **signed_rows(receipt),
        "tree_size": receipt.inclusion.tree_size,
        "key_id": receipt.statement.key_id,
        "signature": receipt.statement.signature,
    }


def verdict_fields(verdict: AnyVerdict) -> dict[str, Any]:
    return {
        **signed_rows(verdict, ("registration_id", "requested_by", "suspect_sha256",
                                 "suspect_size", "reading")),
        "key_id": verdict.statement.key_id,
        "signature": verdict.statement.signature,
    }


def registration_fields(info: RegistrationInfo) -> dict[str, Any]:
    return {
        "registration_id": info.registration_id,
        "owner": info.owner,
        "integrated_time": iso_time(info.integrated_time),
        "host_fingerprint": info.host_fingerprint,
        "watermark_commitment": info.watermark_commitment,
        "layer": info.layer,
        "n_bits": info.n_bits,
        "log_index": info.log_index,
        "revoked_at": "-" if info.revoked_at is None else iso_time(info.revoked_at),
        **({} if info.revocation is None else {
            "revoked_by": info.revocation.revoked_by, "reason": info.revocation.reason,
            "revocation_log_index": info.revocation.log_index}),
    }

