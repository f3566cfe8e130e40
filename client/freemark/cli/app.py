"""The `freemark` command: build triggers, derive keys, extract and judge, talk to the TTP.

Every subcommand prints a readable table, or one JSON object with `--json`. Errors are
one line on stderr and exit status 2; nothing prints a traceback for a bad input.
`freemark receipt verify` exits 1 when a receipt or verdict fails verification.

The commands that talk to the key server take `--server HOST:PORT` and `--token T`, which
default to the FREEMARK_SERVER and FREEMARK_TOKEN environment variables (prefer the
variable for the token: command lines are visible to other users of the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from freemark.audit.receipt import load_statement, verify_in_log, verify_receipt, verify_suspect
from freemark.cli.display import format_value, print_fields, print_json, print_rows
from freemark.cli.log import add_log_parser, add_status_parser
from freemark.derive import DEFAULT_BITS, derive_key
from freemark.errors import (
    FreemarkError,
    InvalidInputError,
    InvalidReceiptError,
    VerificationFailedError,
)
from freemark.extract import extract, extract_onnx
from freemark.formats.local import load_model, upload_file
from freemark.formats.onnx import OnnxModel
from freemark.formats.pt2 import fingerprint
from freemark.formats.table import format_of
from freemark.records.schema import signed_fields, to_json_fields
from freemark.records.types import (
    AnyVerdict,
    Checkpoint,
    CoarseVerdict,
    ConsistencyProof,
    Decision,
    Receipt,
    ReferencePanel,
    RegistrationInfo,
    Revocation,
    SignedVerdict,
    VerdictPolicy,
)
from freemark.records.wire import (
    checkpoint_from_json,
    consistency_from_json,
    receipt_to_json,
    registration_to_json,
    verdict_to_json,
)
from freemark.rpc import DEFAULT_TIMEOUT_S, KeyServiceClient
from freemark.scheme.bundle import load_bundle, save_bundle
from freemark.scheme.keygen import DEFAULT_LAMBDA, DEFAULT_MARGIN, DerivationSettings
from freemark.scheme.text_triggers import DEFAULT_COUNT, DEFAULT_MAX_LENGTH, text_triggers
from freemark.scheme.triggers import (
    DEFAULT_PER_CLASS,
    load_triggers,
    save_triggers,
    select_triggers,
)
from freemark.tlog.note import verifier_key
from freemark.tlog.signatures import Verifier
from freemark.verdict.decision import DEFAULT_ALPHA

LAB_MISSING = ("the robustness lab is not installed; `freemark attack` needs it: "
               "pip install 'freemark[lab]'")
DEFAULT_SERVER = "127.0.0.1:50051"  # where `freemark-keyserver serve` listens by default

Handler = Callable[[argparse.Namespace], int]


def _cmd_triggers(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.text is None):
        raise InvalidInputError("give either --data X.npz or --text FILE --tokenizer DIR")
    if args.text is not None:
        if args.tokenizer is None:
            raise InvalidInputError("--text needs --tokenizer DIR (the checkpoint's tokenizer)")
        triggers = text_triggers(args.text, args.tokenizer, max_length=args.max_length,
                                 per_class=args.per_class, count=args.count, seed=args.seed)
        labels = triggers.labels
    else:
        try:
            with np.load(args.data, allow_pickle=False) as data:
                x, labels = data["x"], data["y"]
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidInputError(
                f"{args.data}: need an .npz with arrays 'x' and 'y' ({exc})"
            ) from exc
        triggers = select_triggers(x, labels, per_class=args.per_class, seed=args.seed)
    save_triggers(args.out, triggers)
    summary = {"out": args.out, "n_triggers": len(triggers),
               "classes": 0 if labels is None else len(np.unique(labels)),
               "shape": list(triggers.inputs.shape)}
    print_json(summary) if args.json else print_fields("trigger set written", summary)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    host = load_model(args.model)
    references = [load_model(r) for r in args.reference]
    settings = DerivationSettings(margin=args.margin, lam=args.lam)
    bundle = derive_key(host, layer=args.layer, triggers=load_triggers(args.triggers),
                        owner=args.owner, n_bits=args.bits, settings=settings,
                        references=references, progress=not args.json)
    save_bundle(args.out, bundle)
    verdict = extract(host, bundle)
    summary = {
        "out": args.out, "layer": bundle.layer, "units": bundle.units, "n_bits": bundle.n_bits,
        "owner": bundle.owner, "host_fingerprint": bundle.host_fingerprint.hex(),
        "margin_target": bundle.margins.target, "margin_min": bundle.margins.min,
        "host_ber": verdict.ber, "host_p_value": verdict.p_value,
        "host_log10_p_value": verdict.log10_p_value, "references": len(references),
    }
    print_json(summary) if args.json else print_fields("key derived (keep KEY.fmk secret)", summary)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.key)
    references = [load_model(r) for r in args.reference]
    if format_of(args.model) == "onnx":
        if args.weights:
            raise InvalidInputError("--weights applies to a .pt2 or checkpoint, not to ONNX")
        suspect = OnnxModel.open(args.model, bundle.layer, tensor=args.onnx_tensor)
        verdict = extract_onnx(suspect, bundle, alpha=args.alpha, references=references)
    elif args.onnx_tensor:
        raise InvalidInputError("--onnx-tensor is for ONNX suspects only")
    else:
        verdict = extract(load_model(args.model, weights=args.weights), bundle,
                          alpha=args.alpha, references=references)
    if args.json:
        print_json(verdict.as_dict())
    else:
        print_fields(f"verdict: {_headline(verdict)}", _signed_rows(verdict))
    return 0


# --- the key server --------------------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: {exc.strerror or exc}") from exc


def _read_optional(path: str | None, what: str) -> bytes | None:
    return None if path is None else _read_file(path, what)


def _client(args: argparse.Namespace) -> KeyServiceClient:
    """A client from the connection flags: TLS unless loopback, or forced on/off by them."""
    tls = False if args.insecure else (True if args.tls_ca or args.client_cert else None)
    return KeyServiceClient(
        args.server,
        token=args.token or None,
        tls=tls,
        root_certificates=_read_optional(args.tls_ca, "CA certificate"),
        client_cert=_read_optional(args.client_cert, "client certificate"),
        client_key=_read_optional(args.client_key, "client key"),
        timeout=args.timeout,
        progress=not args.json and sys.stderr.isatty(),
    )


def _time(micros: int) -> str:
    """Unix microseconds as ISO 8601 UTC, for people; `--json` keeps the integer."""
    return datetime.fromtimestamp(micros / 1e6, tz=UTC).isoformat(timespec="microseconds")


def _headline(verdict: Decision) -> str:
    """The verdict's outcome in words, for the table's title."""
    return {"match": "WATERMARK PRESENT", "no_match": "watermark not found",
            "inconclusive": "INCONCLUSIVE (the reference panel cannot reach alpha)"}[verdict.outcome]


def _signed_rows(record: Any, first: tuple[str, ...] = ()) -> dict[str, Any]:
    """A signed record's fields for a table, from its field list: `first` ones first, times
    in ISO 8601, each test on its own row, the panel in one line."""
    names = [spec.name for spec in signed_fields(type(record))]
    rows: dict[str, Any] = {}
    for name in [*first, *(n for n in names if n not in first)]:
        value = getattr(record, name)
        if name == "integrated_time":
            rows[name] = _time(value)
        elif isinstance(record, CoarseVerdict) and name in ("p_value", "p_value_above"):
            if name == "p_value":
                rows[name] = f"in ({record.p_value_above:g}, {record.p_value:g}] (coarse)"
        elif isinstance(value, ReferencePanel):
            rows[name] = (f"{value.size} reference models, sha256 {value.sha256.hex()}"
                          if value.size else "none")
        elif isinstance(value, VerdictPolicy):
            rows[name] = (f"{value.describe()}, {value.arbiter_disclosure} verdicts for "
                          f"arbiters ({value.id})")
        elif name == "tests":
            for test in value:
                rows[f"test {test.name}"] = (
                    f"{test.statistic:g} of {test.n}, p={format_value(test.p_value)} "
                    f"({test.method})")
        else:
            rows[name] = value
    return rows


def _receipt_fields(receipt: Receipt) -> dict[str, Any]:
    return {
        **_signed_rows(receipt),
        "tree_size": receipt.inclusion.tree_size,
        "key_id": receipt.statement.key_id,
        "signature": receipt.statement.signature,
    }


def _verdict_fields(verdict: AnyVerdict) -> dict[str, Any]:
    return {
        **_signed_rows(verdict, ("registration_id", "requested_by", "suspect_sha256",
                                 "suspect_size")),
        "key_id": verdict.statement.key_id,
        "signature": verdict.statement.signature,
    }


def _registration_fields(info: RegistrationInfo) -> dict[str, Any]:
    return {
        "registration_id": info.registration_id,
        "owner": info.owner,
        "integrated_time": _time(info.integrated_time),
        "host_fingerprint": info.host_fingerprint,
        "watermark_commitment": info.watermark_commitment,
        "layer": info.layer,
        "n_bits": info.n_bits,
        "log_index": info.log_index,
        "revoked_at": "-" if info.revoked_at is None else _time(info.revoked_at),
        **({} if info.revocation is None else {
            "revoked_by": info.revocation.revoked_by, "reason": info.revocation.reason,
            "revocation_log_index": info.revocation.log_index}),
    }


def _cmd_register(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.key)
    with _client(args) as client:
        receipt = client.register(bundle, Path(args.model),
                                  references=[Path(r) for r in args.reference])
    if args.json:
        print_json(receipt_to_json(receipt))
    else:
        print_fields("registered (save the receipt with --json: it is your evidence of "
                     "priority)", _receipt_fields(receipt))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.weights is None and args.model is None:
        raise InvalidInputError(
            "give the suspect as --model SUSPECT (.pt2, checkpoint directory or .onnx) or "
            "--weights S.safetensors"
        )
    suspect = Path(args.weights) if args.weights is not None else Path(args.model)
    with _client(args) as client:
        verdict = client.verify(args.registration, suspect,
                                fmt="safetensors" if args.weights is not None else None,
                                alpha=args.alpha, onnx_tensor=args.onnx_tensor)
    if args.json:
        print_json(verdict_to_json(verdict))
    else:
        title = _headline(verdict)
        print_fields(f"signed verdict: {title}", _verdict_fields(verdict))
    return 0


def _cmd_registrations_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = list(client.list_registrations(page_size=args.page_size))
    if args.json:
        print_json({"registrations": [registration_to_json(info) for info in infos]})
    elif not infos:
        print("no registrations")
    else:
        columns = ["registration_id", "owner", "integrated_time", "layer", "n_bits",
                   "log_index", "revoked_at"]
        rows = [[_registration_fields(info)[c] for c in columns] for info in infos]
        print_rows(columns, rows)
    return 0


def _show_registration(args: argparse.Namespace, title: str, info: RegistrationInfo) -> None:
    if args.json:
        print_json(registration_to_json(info))
    else:
        print_fields(title, _registration_fields(info))


def _cmd_registrations_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_registration(args.registration_id)
    _show_registration(args, f"registration {info.registration_id}", info)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.revoke(args.registration_id, reason=args.reason)
    _show_registration(args, f"revoked {info.registration_id}", info)
    return 0


def _cmd_public_key(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pem, origin = client.log_key()
    try:
        verifier = Verifier.from_pem(pem)
        note_key = verifier_key(origin, verifier)
    except ValueError as exc:
        raise InvalidInputError(f"the server's public key or origin is unusable: {exc}") from exc
    if args.out:
        Path(args.out).write_bytes(pem)
    shown = {"key_id": verifier.key_id, "origin": origin, "note_verifier_key": note_key}
    if args.json:
        print_json({**shown, "pem": pem.decode("ascii"), "out": args.out})
    elif args.out:
        print_fields("public key written (pin it and the origin)", {**shown, "out": args.out})
    else:
        sys.stdout.write(pem.decode("ascii"))
    return 0


def _load_log_state(path: str) -> Checkpoint | ConsistencyProof:
    """A checkpoint JSON, or a consistency proof JSON ending in the checkpoint to trust."""
    try:
        data = json.loads(_read_file(path, "checkpoint"))
    except ValueError as exc:
        raise InvalidReceiptError(f"{path} is not JSON ({exc})") from None
    if isinstance(data, dict) and "old_size" in data:
        return consistency_from_json(data)
    return checkpoint_from_json(data)


def _check_model(statement: Receipt | AnyVerdict | Revocation, path: str) -> None:
    """`--model`: a verdict's suspect by SHA-256 and size (a checkpoint directory as packed for
    the upload), a receipt's host by weights."""
    if isinstance(statement, Revocation):
        raise InvalidInputError("--model is for receipts and verdicts; a revocation names a "
                                "registration, not a file")
    if isinstance(statement, Receipt):
        fingerprint_of = fingerprint(load_model(path))
        if fingerprint_of != statement.host_fingerprint:
            raise VerificationFailedError(
                f"{path} is not the model this receipt registers: its weight fingerprint is "
                f"{fingerprint_of.hex()}, the receipt's {statement.host_fingerprint.hex()}")
        return
    with upload_file(path) as sent:  # a checkpoint directory: the packed file that was sent
        verify_suspect(statement, sent)


_KINDS = {Receipt: "receipt", SignedVerdict: "verdict", CoarseVerdict: "coarse verdict",
          Revocation: "revocation"}
# What a reader looks for first in a statement's table.
_FIRST = ("registration_id", "outcome", "alpha", "p_value", "p_value_above", "suspect_sha256",
          "suspect_size", "requested_by", "integrated_time", "owner", "host_fingerprint")


def _cmd_receipt_verify(args: argparse.Namespace) -> int:
    pem = _read_file(args.public_key, "public key")
    checked = []
    try:
        statement = load_statement(args.file)
        verify_receipt(statement, pem, origin=args.origin)
        checked.append("signature, canonical body, log inclusion"
                       + (", verdict policy and decision"
                          if isinstance(statement, (SignedVerdict, CoarseVerdict)) else ""))
        if args.model is not None:
            _check_model(statement, args.model)
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
        rows = {"kind": kind, **_signed_rows(statement, tuple(
            n for n in _FIRST if hasattr(statement, n))),
            "tree_size": statement.inclusion.tree_size, "key_id": statement.statement.key_id,
            "checked": "; ".join(checked)}
        print_fields(f"OK {kind} for {statement.registration_id}, signed by key "
                     f"{statement.statement.key_id}", rows)
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a table")


def _add_origin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--origin", default=os.environ.get("FREEMARK_ORIGIN"),
                        help="the log's origin, as `freemark public-key` shows it (env "
                             "FREEMARK_ORIGIN): checkpoints of any other log are refused")


def _add_connection(parser: argparse.ArgumentParser) -> None:
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
    _add_common(parser)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(prog="freemark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("triggers", help="pick a seeded trigger set (≥ 1 sample per class)")
    p.add_argument("--data", help=".npz with arrays x (inputs) and y (labels)")
    p.add_argument("--text", help="UTF-8 text, one sentence per line, optionally LABEL<TAB>TEXT")
    p.add_argument("--tokenizer", help="with --text: the checkpoint directory holding its "
                   "tokenizer (local files only)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="with --text: tokens per trigger at most (default %(default)s)")
    p.add_argument("--count", type=int, default=DEFAULT_COUNT,
                   help="with unlabelled --text: sentences to draw (default %(default)s)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="triggers .npz to write (secret)")
    _add_common(p)
    p.set_defaults(handler=_cmd_triggers)

    p = sub.add_parser("keygen", help="derive a secret key for a model; no weight changes")
    p.add_argument("--model", required=True, help="host model: a torch.export .pt2 or a "
                   "Hugging Face checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--layer", required=True, help="module name as named_modules() gives it")
    p.add_argument("--triggers", required=True, help="triggers .npz (inputs[, attention_mask])")
    p.add_argument("--owner", required=True, help="owner identity the watermark is bound to")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS,
                   help="watermark length N in [16, 8192]")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA,
                   help="pull towards the random anchor")
    p.add_argument("--reference", action="append", default=[],
                   help="an unrelated model of the same architecture (repeatable)")
    p.add_argument("--out", required=True, help="key bundle .fmk to write (mode 0600)")
    _add_common(p)
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("extract", help="extract the watermark from a suspect and judge it")
    p.add_argument("--model", required=True, help="suspect: .pt2, Hugging Face checkpoint "
                   "directory or .onnx")
    p.add_argument("--weights", help="optional .safetensors applied to the model's architecture")
    p.add_argument("--onnx-tensor", help="ONNX suspects: the key layer's tensor name (default: "
                   "found from the layer's module name)")
    p.add_argument("--key", required=True, help="key bundle .fmk")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level")
    p.add_argument("--reference", action="append", default=[], metavar="R.pt2",
                   help="an independently trained model of the host's architecture (repeat; "
                        "3 or more add the aligned test; run in this process: trusted files only)")
    _add_common(p)
    p.set_defaults(handler=_cmd_extract)

    p = sub.add_parser("register", help="register a key and its host model with the key server")
    p.add_argument("--key", required=True, help="key bundle .fmk")
    p.add_argument("--model", required=True, help="host model: a torch.export .pt2 or a "
                   "Hugging Face checkpoint directory (packed into one file for the upload)")
    p.add_argument("--reference", action="append", default=[], metavar="R.pt2",
                   help="an independently trained model of the host's architecture (repeat; "
                        "3 or more enable the aligned test, which sees through relabelled, "
                        "rescaled or padded copies; fixed at registration)")
    _add_connection(p)
    p.set_defaults(handler=_cmd_register)

    p = sub.add_parser("verify", help="ask the key server for a signed verdict on a suspect")
    p.add_argument("--registration", required=True, help="registration id")
    p.add_argument("--model", help="suspect: .pt2, Hugging Face checkpoint directory or .onnx")
    p.add_argument("--onnx-tensor", help="ONNX suspects: the key layer's tensor name (default: "
                   "found by the server from the layer's module name)")
    p.add_argument("--weights", help="suspect .safetensors; uploaded instead of --model and "
                   "applied by the server to the architecture registered with the host")
    p.add_argument("--alpha", type=float, help=f"significance level (default {DEFAULT_ALPHA}); "
                   "the server refuses one outside its verdict policy's range")
    _add_connection(p)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("registrations", help="list or show your registrations")
    regs = p.add_subparsers(dest="action", required=True)
    q = regs.add_parser("list", help="every registration you may see")
    q.add_argument("--page-size", type=int, default=20, help="registrations per request")
    _add_connection(q)
    q.set_defaults(handler=_cmd_registrations_list)
    q = regs.add_parser("show", help="one registration's metadata")
    q.add_argument("registration_id")
    _add_connection(q)
    q.set_defaults(handler=_cmd_registrations_show)

    p = sub.add_parser("revoke", help="revoke a registration (it stays in the log)")
    p.add_argument("registration_id")
    p.add_argument("--reason", default="", help="recorded with the revocation")
    _add_connection(p)
    p.set_defaults(handler=_cmd_revoke)

    p = sub.add_parser("public-key", help="fetch the key server's public key (PEM)")
    p.add_argument("--out", help="write the PEM here instead of printing it")
    _add_connection(p)
    p.set_defaults(handler=_cmd_public_key)

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
    q.add_argument("--checkpoint", metavar="LATEST.json",
                   help="fail unless the statement is in the log this checkpoint signs (a "
                        "checkpoint JSON of the same size, or a consistency proof JSON from the "
                        "statement's checkpoint to a later one)")
    _add_origin(q)
    _add_common(q)
    q.set_defaults(handler=_cmd_receipt_verify)
    add_status_parser(receipts, _add_connection, _add_origin, _client)
    add_log_parser(sub, _add_connection, _add_origin, _client)
    _add_attack(sub)
    return parser


def _add_attack(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`freemark attack` from the lab (freemark[lab]), or a stub that says how to install it.

    The library never depends on the lab: the lab is found at run time, if installed.
    """
    try:
        from freemark_lab.attack_cli import add_attack_parser
    except ImportError:
        # No option prefix: every argument, `--config` and `-h` included, lands in `rest`,
        # so any invocation reaches the handler's one-line message.
        p = subparsers.add_parser("attack", help="run the robustness suite (needs freemark[lab])",
                                  add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        p.set_defaults(handler=_cmd_attack_missing)
        return
    add_attack_parser(subparsers)


def _cmd_attack_missing(args: argparse.Namespace) -> int:
    raise InvalidInputError(LAB_MISSING)


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
