"""The `freemark` command: build triggers, derive keys, extract and judge, talk to the TTP.

Every subcommand prints a readable table, or one JSON object with `--json`. Errors are
one line on stderr and exit status 2; nothing prints a traceback for a bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import numpy as np

from freemark.bundle import load_bundle, save_bundle
from freemark.derive import DEFAULT_BITS, derive_key
from freemark.display import print_fields, print_json
from freemark.errors import FreemarkError, InvalidInputError
from freemark.extract import extract
from freemark.keygen import DEFAULT_LAMBDA, DEFAULT_MARGIN, DerivationSettings
from freemark.modelfile import apply_weights, load_program
from freemark.triggers import DEFAULT_PER_CLASS, load_triggers, save_triggers, select_triggers
from freemark.verdict import DEFAULT_ALPHA

Handler = Callable[[argparse.Namespace], int]


def _cmd_triggers(args: argparse.Namespace) -> int:
    try:
        with np.load(args.data, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInputError(f"{args.data}: need an .npz with arrays 'x' and 'y' ({exc})") from exc
    triggers = select_triggers(x, y, per_class=args.per_class, seed=args.seed)
    save_triggers(args.out, triggers)
    summary = {"out": args.out, "n_triggers": len(triggers), "classes": int(len(np.unique(y)))}
    print_json(summary) if args.json else print_fields("trigger set written", summary)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    host = load_program(args.model)
    references = [load_program(r) for r in args.reference]
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
    program = load_program(args.model)
    suspect = apply_weights(program, args.weights) if args.weights else program
    references = [load_program(r) for r in args.reference]
    verdict = extract(suspect, bundle, alpha=args.alpha, references=references)
    if args.json:
        print_json(verdict.as_dict())
    else:
        title = "WATERMARK PRESENT" if verdict.is_match else "watermark not found"
        print_fields(f"verdict: {title}", verdict.as_dict())
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(prog="freemark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("triggers", help="pick a seeded trigger set (≥ 1 sample per class)")
    p.add_argument("--data", required=True, help=".npz with arrays x (inputs) and y (labels)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="triggers .npz to write (secret)")
    _add_common(p)
    p.set_defaults(handler=_cmd_triggers)

    p = sub.add_parser("keygen", help="derive a secret key for a model; no weight changes")
    p.add_argument("--model", required=True, help="host model, a torch.export .pt2")
    p.add_argument("--layer", required=True, help="module name as named_modules() gives it")
    p.add_argument("--triggers", required=True, help="triggers .npz (inputs[, attention_mask])")
    p.add_argument("--owner", required=True, help="owner identity the watermark is bound to")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS, help="watermark length N in [16, 8192]")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="pull towards the random anchor")
    p.add_argument("--reference", action="append", default=[],
                   help="an unrelated model of the same architecture (repeatable)")
    p.add_argument("--out", required=True, help="key bundle .fmk to write (mode 0600)")
    _add_common(p)
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("extract", help="extract the watermark from a suspect and judge it")
    p.add_argument("--model", required=True, help="suspect model .pt2")
    p.add_argument("--weights", help="optional .safetensors applied to the .pt2 architecture")
    p.add_argument("--key", required=True, help="key bundle .fmk")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level")
    p.add_argument("--reference", action="append", default=[],
                   help="an unrelated model to add to the null (repeatable)")
    _add_common(p)
    p.set_defaults(handler=_cmd_extract)
    return parser


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
