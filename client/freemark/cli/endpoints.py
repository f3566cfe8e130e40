"""The command line's side of output keys and endpoints: `register` with an output key,
`verify --endpoint` (a signed verdict by the key server) and `extract --endpoint` (the
owner's own check of an endpoint, in this process, without the key server).

An endpoint is named by its Open Inference Protocol v2 base URL and the served model's
name (`--endpoint-model`), or by the model's own URL, `http://host:port/v2/models/NAME`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from urllib.parse import urlsplit

from freemark.blackbox.judge import extract_outputs
from freemark.blackbox.key import load_output_key
from freemark.cli.common import client, headline, receipt_fields, signed_rows
from freemark.cli.display import print_fields, print_json
from freemark.cli.outputs import passphrase
from freemark.endpoint import EndpointPolicy, EndpointSession
from freemark.errors import InvalidInputError
from freemark.records.wire import endpoint_verdict_to_json, receipt_to_json

__all__ = ["extract_from_endpoint", "register_output_key", "split_endpoint", "verify_endpoint"]

_MODEL_PATH = re.compile(r"^(?P<base>.*?)/v2/models/(?P<model>[^/]+)/?$")


def split_endpoint(url: str, model: str | None) -> tuple[str, str]:
    """(base URL, model name) from `--endpoint` and `--endpoint-model`."""
    if model:
        return url, model
    found = _MODEL_PATH.match(url)
    if found is None:
        raise InvalidInputError(f"name the served model: --endpoint-model NAME, or give its URL "
                                f"as http://host:port/v2/models/NAME (got {url!r})")
    return found["base"], found["model"]


def register_output_key(args: argparse.Namespace) -> int:
    """`register --key OUTKEY --model HOST --reference ...` (the key's whole panel)."""
    key = load_output_key(args.key, passphrase(confirm=False))
    with client(args) as ttp:
        receipt = ttp.register_output_key(key, Path(args.model),
                                          references=[Path(r) for r in args.reference])
    if args.json:
        print_json(receipt_to_json(receipt))
    else:
        print_fields("registered (save the receipt with --json: it is your evidence of "
                     "priority)", receipt_fields(receipt))
    return 0


def verify_endpoint(args: argparse.Namespace) -> int:
    """`verify --registration REG --endpoint URL [--endpoint-model NAME] [--labels-only]`."""
    if args.model or args.weights or args.onnx_tensor:
        raise InvalidInputError("--endpoint verifies a live endpoint: --model, --weights and "
                                "--onnx-tensor are for uploaded suspects")
    base, model = split_endpoint(args.endpoint, args.endpoint_model)
    with client(args) as ttp:
        verdict = ttp.verify_endpoint(args.registration, base, model,
                                      labels_only=args.labels_only, alpha=args.alpha)
    if args.json:
        print_json(endpoint_verdict_to_json(verdict))
    else:
        print_fields(f"signed endpoint verdict: {headline(verdict)}",
                     {**signed_rows(verdict, ("registration_id", "requested_by", "endpoint",
                                              "model_name", "model_version")),
                      "key_id": verdict.statement.key_id,
                      "signature": verdict.statement.signature})
    return 0


def extract_from_endpoint(args: argparse.Namespace) -> int:
    """`extract --key OUTKEY --endpoint URL`: the owner asks the endpoint one query set
    himself and judges the answers with his key's panel. Only the URL's own host is
    allow-listed (a name admits its public addresses only; name a loopback or private
    endpoint by its address)."""
    if args.model or args.reference or args.weights or args.onnx_tensor:
        raise InvalidInputError("--endpoint asks a live endpoint: --model, --reference, "
                                "--weights and --onnx-tensor are for local files")
    base, model = split_endpoint(args.endpoint, args.endpoint_model)
    host = urlsplit(base).hostname or ""
    key = load_output_key(args.key, passphrase(confirm=False))
    session = EndpointSession(base, model, policy=EndpointPolicy(allow=(host,)))
    verdict = extract_outputs(session, key, set_id=args.set, alpha=args.alpha,
                              labels_only=args.labels_only)
    transcript = session.transcript()
    if args.json:
        print_json({**verdict.as_dict(), "endpoint": transcript.endpoint,
                    "model_name": transcript.model_name,
                    "model_version": transcript.model_version,
                    "inputs_sent": transcript.inputs_sent})
    else:
        print_fields(f"verdict: {headline(verdict)}",
                     {"endpoint": transcript.endpoint, "model_name": transcript.model_name,
                      "model_version": transcript.model_version, **signed_rows(verdict)})
    return 0
