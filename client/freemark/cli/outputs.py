"""`freemark keygen --outputs` and `freemark extract` with an output key: the black-box mode
(docs/blackbox.md), run in this process on the owner's own files.

An output key file is encrypted under a passphrase: the FREEMARK_KEY_PASSPHRASE environment
variable, or a prompt on a terminal (never an option: command lines are visible to other
users of the machine).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

import numpy as np

from freemark.blackbox.judge import extract_outputs
from freemark.blackbox.key import MIN_PASSPHRASE, load_output_key, save_output_key
from freemark.blackbox.local import LocalResponder
from freemark.blackbox.queries import QuerySettings, derive_output_key
from freemark.cli.common import headline, signed_rows
from freemark.cli.display import print_fields, print_json
from freemark.errors import InvalidInputError
from freemark.formats.local import load_model

__all__ = ["PASSPHRASE_ENV", "extract_with_output_key", "keygen_outputs"]

PASSPHRASE_ENV = "FREEMARK_KEY_PASSPHRASE"


def passphrase(*, confirm: bool) -> bytes:
    """The output key's passphrase: the environment variable, or asked on a terminal."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        if not sys.stdin.isatty():
            raise InvalidInputError(f"an output key is encrypted: set {PASSPHRASE_ENV} (at "
                                    f"least {MIN_PASSPHRASE} characters) or run on a terminal")
        value = getpass.getpass("output key passphrase: ")
        if confirm and getpass.getpass("again: ") != value:
            raise InvalidInputError("the two passphrases differ")
    return value.encode()


def _owner_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInputError(f"{path}: need an .npz with arrays 'x' and 'y' ({exc})") from exc


def keygen_outputs(args: argparse.Namespace) -> int:
    """Derive an output key (`keygen --outputs`)."""
    if args.data is None:
        raise InvalidInputError("--outputs needs --data OWNER.npz (the owner's own images)")
    if args.layer or args.triggers:
        raise InvalidInputError("--layer and --triggers are for white-box keys, not --outputs")
    secret = passphrase(confirm=True)
    if len(secret) < MIN_PASSPHRASE:  # before the long work, not after it
        raise InvalidInputError(f"the passphrase needs at least {MIN_PASSPHRASE} characters")
    x, y = _owner_data(args.data)
    host = load_model(args.model)
    references = [load_model(r) for r in args.reference]
    settings = QuerySettings(eps=args.eps, seed=args.seed)
    key = derive_output_key(host, x, y, references, owner=args.owner, n_queries=args.queries,
                            n_sets=args.sets, settings=settings, progress=not args.json)
    save_output_key(args.out, key, secret)
    verdict = extract_outputs(LocalResponder(host), key, set_id=0)
    summary: dict[str, Any] = {
        "out": args.out, "kind": "outputs", "owner": key.owner, "sets": key.n_sets,
        "queries_per_set": args.queries, "input_shape": list(key.queries.shape[1:]),
        "input_dtype": key.queries.dtype.name, "references": len(references),
        "host_fingerprint": key.host_fingerprint.hex(),
        "seconds": key.parameters["seconds"],
        "seconds_per_256_queries": key.parameters["seconds_per_256_queries"],
        **{f"host_log10_p_{t.name}": t.log10_p_value for t in verdict.tests},
    }
    if args.json:
        print_json(summary)
    else:
        print_fields("output key derived (keep KEY secret, and its passphrase)", summary)
    return 0


def extract_with_output_key(args: argparse.Namespace) -> int:
    """Judge a local model file through its outputs (`extract --key OUTKEY`)."""
    if args.reference or args.weights or args.onnx_tensor:
        raise InvalidInputError("an output key carries its panel's answers and reads only a "
                                "model's outputs: --reference, --weights and --onnx-tensor "
                                "are for white-box keys")
    key = load_output_key(args.key, passphrase(confirm=False))
    responder = LocalResponder.open(args.model, labels_only=args.labels_only)
    verdict = extract_outputs(responder, key, set_id=args.set, alpha=args.alpha,
                              labels_only=args.labels_only)
    if args.json:
        print_json(verdict.as_dict())
    else:
        print_fields(f"verdict: {headline(verdict)}", signed_rows(verdict))
    return 0
