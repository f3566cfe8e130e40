"""`freemark register|verify|registrations|revoke|public-key`: talking to the key server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from freemark.blackbox.key import is_output_key, load_output_key
from freemark.cli.common import (
    Subparsers,
    add_connection,
    client,
    headline,
    receipt_fields,
    registration_fields,
    verdict_fields,
)
from freemark.cli.display import print_fields, print_json, print_rows
from freemark.cli.endpoints import register_output_key, verify_endpoint
from freemark.cli.outputs import passphrase
from freemark.errors import InvalidInputError
from freemark.formats import table
from freemark.records.types import RegistrationInfo
from freemark.records.wire import receipt_to_json, registration_to_json, verdict_to_json
from freemark.rpc import ModelFormat, ServerModel
from freemark.scheme.bundle import load_bundle
from freemark.tlog.note import verifier_key
from freemark.tlog.signatures import Verifier
from freemark.verdict.decision import DEFAULT_ALPHA

__all__ = ["add_parsers"]


def _server_model(args: argparse.Namespace) -> ServerModel | None:
    """`--server-model NAME` (and `--server-format`): a file the key server reads from its
    operator's model root instead of an upload. The client holds no copy to look at, so the
    format comes from the flag, else from a suffix only one format uses (`.safetensors` is a
    checkpoint, an adapter or bare weights: it must be named)."""
    if args.server_model is None:
        if args.server_format is not None:
            raise InvalidInputError("--server-format goes with --server-model")
        return None
    if args.server_format is not None:
        return ServerModel(args.server_model,
                           cast(ModelFormat, table.by_name(args.server_format).name))
    suffix = Path(args.server_model).suffix
    rows = [row for row in table.FORMATS if row.suffix == suffix]
    if len(rows) != 1:
        raise InvalidInputError(
            f"--server-model {args.server_model}: name its format with --server-format "
            f"({', '.join(row.name for row in table.FORMATS)}); the suffix {suffix or '(none)'!r} "
            "does not tell it")
    return ServerModel(args.server_model, cast(ModelFormat, rows[0].name))


def _cmd_register(args: argparse.Namespace) -> int:
    named = _server_model(args)
    if is_output_key(args.key):
        if args.output_key:
            raise InvalidInputError("--output-key goes beside a white-box --key (.fmk); "
                                    "register an output key alone with --key OUTKEY")
        if named is not None:
            raise InvalidInputError("an output key registers with its host uploaded "
                                    "(--model HOST), not --server-model")
        return register_output_key(args)
    bundle = load_bundle(args.key)
    output_key = None
    if args.output_key:
        if not is_output_key(args.output_key):
            raise InvalidInputError(f"{args.output_key} is not an output key "
                                    "(freemark keygen --outputs)")
        output_key = load_output_key(args.output_key, passphrase(confirm=False))
    with client(args) as ttp:
        receipt = ttp.register(bundle, named or Path(args.model), output_key=output_key,
                               references=[Path(r) for r in args.reference])
    if args.json:
        print_json(receipt_to_json(receipt))
    else:
        print_fields("registered (save the receipt with --json: it is your evidence of "
                     "priority)", receipt_fields(receipt))
    if receipt.panel_warning:  # registered, but the panel cannot serve it (signed in the receipt)
        print(f"freemark: warning: {receipt.panel_warning}", file=sys.stderr)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.endpoint:
        return verify_endpoint(args)
    if args.endpoint_model or args.labels_only:
        raise InvalidInputError("--endpoint-model and --labels-only apply to --endpoint")
    named = _server_model(args)
    given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights),
                                      ("--server-model", args.server_model)) if value]
    if not given:
        raise InvalidInputError(
            "give the suspect as --model SUSPECT (.pt2, checkpoint directory or .onnx), "
            "--weights S.safetensors, --server-model NAME for a file under the key server's "
            "model root, or --endpoint URL for a model behind a prediction API"
        )
    if named is not None and (len(given) > 1 or args.adapter is not None):
        raise InvalidInputError("--server-model names the whole suspect: give it without "
                                "--model, --weights or --adapter")
    if args.adapter is not None and args.model is None:
        raise InvalidInputError("--adapter needs its base: --model BASE_DIR --adapter ADAPTER_DIR")
    if args.adapter is not None and args.weights is not None:
        raise InvalidInputError("give --weights or --adapter, not both")
    suspect = named or (Path(args.weights) if args.weights is not None else Path(args.model))
    with client(args) as ttp:
        verdict = ttp.verify(args.registration, suspect,
                                fmt="safetensors" if args.weights is not None else None,
                                alpha=args.alpha, onnx_tensor=args.onnx_tensor,
                                adapter=Path(args.adapter) if args.adapter else None)
    if args.json:
        print_json(verdict_to_json(verdict))
    else:
        title = headline(verdict)
        print_fields(f"signed verdict: {title}", verdict_fields(verdict))
    return 0


def _cmd_registrations_list(args: argparse.Namespace) -> int:
    with client(args) as ttp:
        infos = list(ttp.list_registrations(page_size=args.page_size))
    if args.json:
        print_json({"registrations": [registration_to_json(info) for info in infos]})
    elif not infos:
        print("no registrations")
    else:
        columns = ["registration_id", "owner", "integrated_time", "layer", "n_bits",
                   "log_index", "revoked_at"]
        rows = [[registration_fields(info)[c] for c in columns] for info in infos]
        print_rows(columns, rows)
    return 0


def _show_registration(args: argparse.Namespace, title: str, info: RegistrationInfo) -> None:
    if args.json:
        print_json(registration_to_json(info))
    else:
        print_fields(title, registration_fields(info))


def _cmd_registrations_show(args: argparse.Namespace) -> int:
    with client(args) as ttp:
        info = ttp.get_registration(args.registration_id)
    _show_registration(args, f"registration {info.registration_id}", info)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    with client(args) as ttp:
        info = ttp.revoke(args.registration_id, reason=args.reason)
    _show_registration(args, f"revoked {info.registration_id}", info)
    return 0


def _cmd_public_key(args: argparse.Namespace) -> int:
    with client(args) as ttp:
        pem, origin = ttp.log_key()
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


_SERVER_MODEL_HELP = ("a file the key server reads itself, by its path under the operator's "
                      "model root (`serve --model-root`, a hub's mirror): nothing is uploaded, "
                      "and the receipt or verdict names the bytes the server read")


def add_parsers(sub: Subparsers) -> None:
    """`register`, `verify`, `registrations list|show`, `revoke` and `public-key`."""
    p = sub.add_parser("register", help="register a key and its host model with the key server")
    p.add_argument("--key", required=True, help="key bundle .fmk, or an output key (its "
                   "passphrase from FREEMARK_KEY_PASSPHRASE or a prompt)")
    host = p.add_mutually_exclusive_group(required=True)
    host.add_argument("--model", help="host model: a torch.export .pt2 or a Hugging Face "
                      "checkpoint directory (packed into one file for the upload)")
    host.add_argument("--server-model", metavar="NAME", help=_SERVER_MODEL_HELP)
    p.add_argument("--server-format", choices=[f.name for f in table.FORMATS],
                   help="--server-model's format where its suffix does not tell it")
    p.add_argument("--reference", action="append", default=[], metavar="R",
                   help="an independently trained model of the host's architecture, a .pt2 "
                        "or, beside a checkpoint host, a checkpoint directory (repeat; "
                        "3 or more enable the aligned test, which sees through relabelled, "
                        "rescaled or padded copies; fixed at registration); an output key "
                        "needs the panel it was derived against (at least 8, 2 architectures)")
    p.add_argument("--output-key", metavar="OUTKEY", help="with a white-box --key: an output "
                   "key of the same host, registered in the same registration (its panel "
                   "among the --reference models, found by their weights); a Verify of a "
                   "model file then runs every test of both keys")
    add_connection(p)
    p.set_defaults(handler=_cmd_register)

    p = sub.add_parser("verify", help="ask the key server for a signed verdict on a suspect")
    p.add_argument("--registration", required=True, help="registration id")
    p.add_argument("--model", help="suspect: .pt2, Hugging Face checkpoint directory, .onnx "
                   "or .gguf (llama.cpp; judged in the registered checkpoint's architecture)")
    p.add_argument("--onnx-tensor", help="ONNX suspects: one more tensor for the server to "
                   "judge (it locates the key layer itself among every candidate tensor and "
                   "the verdict names the one read)")
    p.add_argument("--weights", help="suspect .safetensors; uploaded instead of --model and "
                   "applied by the server to the architecture registered with the host")
    p.add_argument("--server-model", metavar="NAME", help=_SERVER_MODEL_HELP)
    p.add_argument("--server-format", choices=[f.name for f in table.FORMATS],
                   help="--server-model's format where its suffix does not tell it")
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter directory "
                   "(adapter_config.json, adapter_model.safetensors) for --model BASE_DIR: both "
                   "are packed into one upload and the server merges them in its sandbox")
    p.add_argument("--alpha", type=float, help=f"significance level (default {DEFAULT_ALPHA}); "
                   "the server refuses one outside its verdict policy's range")
    p.add_argument("--endpoint", metavar="URL", help="verify the model behind a live Open "
                   "Inference Protocol v2 endpoint (http://host:port, which the key server's "
                   "operator must allow-list) with the registration's output key")
    p.add_argument("--endpoint-model", metavar="NAME", help="the served model's name (default: "
                   "read from an --endpoint URL ending in /v2/models/NAME)")
    p.add_argument("--labels-only", action="store_true",
                   help="--endpoint: read only top-1 labels even where scores are returned")
    add_connection(p)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("registrations", help="list or show your registrations")
    regs = p.add_subparsers(dest="action", required=True)
    q = regs.add_parser("list", help="every registration you may see")
    q.add_argument("--page-size", type=int, default=20, help="registrations per request")
    add_connection(q)
    q.set_defaults(handler=_cmd_registrations_list)
    q = regs.add_parser("show", help="one registration's metadata")
    q.add_argument("registration_id")
    add_connection(q)
    q.set_defaults(handler=_cmd_registrations_show)

    p = sub.add_parser("revoke", help="revoke a registration (it stays in the log)")
    p.add_argument("registration_id")
    p.add_argument("--reason", default="", help="recorded with the revocation")
    add_connection(p)
    p.set_defaults(handler=_cmd_revoke)

    p = sub.add_parser("public-key", help="fetch the key server's public key (PEM)")
    p.add_argument("--out", help="write the PEM here instead of printing it")
    add_connection(p)
    p.set_defaults(handler=_cmd_public_key)
