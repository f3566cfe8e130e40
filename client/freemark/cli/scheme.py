"""`freemark triggers|keygen|extract`: the owner's scheme, run in this process.

`keygen --outputs` and `extract` with an output key are the black-box mode (`outputs`)."""

from __future__ import annotations

import argparse

import numpy as np

from freemark.blackbox.key import is_output_key
from freemark.blackbox.queries import MIN_REFERENCES, QuerySettings
from freemark.cli.common import Subparsers, add_json, headline, signed_rows
from freemark.cli.display import print_fields, print_json
from freemark.cli.endpoints import extract_from_endpoint
from freemark.cli.outputs import PASSPHRASE_ENV, extract_with_output_key, keygen_outputs
from freemark.derive import DEFAULT_BITS, derive_key
from freemark.errors import InvalidInputError
from freemark.extract import extract, extract_onnx
from freemark.formats.local import load_model
from freemark.formats.onnx import OnnxModel
from freemark.formats.table import format_of
from freemark.scheme.bundle import load_bundle, save_bundle
from freemark.scheme.keygen import DEFAULT_LAMBDA, DEFAULT_MARGIN, DerivationSettings
from freemark.scheme.probes import DEFAULT_PROBES, MAX_PROBES
from freemark.scheme.text_triggers import DEFAULT_COUNT, DEFAULT_MAX_LENGTH, text_triggers
from freemark.scheme.triggers import (
    DEFAULT_PER_CLASS,
    load_triggers,
    save_triggers,
    select_triggers,
)
from freemark.verdict.decision import DEFAULT_ALPHA

__all__ = ["add_parsers"]


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
    if args.outputs:
        return keygen_outputs(args)
    if not args.layer or not args.triggers:
        raise InvalidInputError("a white-box key needs --layer and --triggers (or --outputs "
                                "for an output key)")
    if args.data is not None:
        raise InvalidInputError("--data is for --outputs; a white-box key reads --triggers")
    host = load_model(args.model)
    references = [load_model(r) for r in args.reference]
    settings = DerivationSettings(margin=args.margin, lam=args.lam)
    bundle = derive_key(host, layer=args.layer, triggers=load_triggers(args.triggers),
                        owner=args.owner, n_bits=args.bits, settings=settings,
                        references=references, probes=args.probes, progress=not args.json)
    save_bundle(args.out, bundle)
    verdict = extract(host, bundle)
    summary = {
        "out": args.out, "layer": bundle.layer, "units": bundle.units, "n_bits": bundle.n_bits,
        "owner": bundle.owner, "host_fingerprint": bundle.host_fingerprint.hex(),
        "margin_target": bundle.margins.target, "margin_min": bundle.margins.min,
        "host_ber": verdict.ber, "host_p_value": verdict.p_value,
        "host_log10_p_value": verdict.log10_p_value, "references": len(references),
        "probes": 0 if bundle.probe_profile is None else len(bundle.probe_profile),
    }
    print_json(summary) if args.json else print_fields("key derived (keep KEY.fmk secret)", summary)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    if args.endpoint:
        if not is_output_key(args.key):
            raise InvalidInputError("--endpoint needs an output key (keygen --outputs): a "
                                    "white-box key reads activations, which an API never shows")
        return extract_from_endpoint(args)
    if args.model is None:
        raise InvalidInputError("give the suspect as --model FILE, or --endpoint URL with an "
                                "output key")
    if is_output_key(args.key):
        return extract_with_output_key(args)
    if args.labels_only or args.set:
        raise InvalidInputError("--labels-only and --set apply to output keys")
    bundle = load_bundle(args.key)
    references = [load_model(r) for r in args.reference]
    if args.adapter is not None:
        verdict = extract(load_model(args.model, weights=args.weights, adapter=args.adapter),
                          bundle, alpha=args.alpha, references=references)
    elif format_of(args.model) == "onnx":
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
        print_fields(f"verdict: {headline(verdict)}", signed_rows(verdict))
    return 0



def add_parsers(sub: Subparsers) -> None:
    """`triggers`, `keygen` and `extract`."""
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
    add_json(p)
    p.set_defaults(handler=_cmd_triggers)

    p = sub.add_parser("keygen", help="derive a secret key for a model; no weight changes")
    p.add_argument("--model", required=True, help="host model: a torch.export .pt2 or a "
                   "Hugging Face checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--layer", help="white-box key: module name as named_modules() gives it")
    p.add_argument("--triggers", help="white-box key: triggers .npz (inputs[, attention_mask])")
    p.add_argument("--outputs", action="store_true",
                   help="derive an output key instead: secret queries read through the "
                        "model's answers alone (docs/blackbox.md); encrypted under "
                        f"{PASSPHRASE_ENV} or a prompted passphrase")
    p.add_argument("--data", help="with --outputs: the owner's images, an .npz with x (the "
                   "host's input domain and dtype) and y, as `freemark triggers --data`")
    p.add_argument("--queries", type=int, default=256,
                   help="with --outputs: queries per set (default %(default)s)")
    p.add_argument("--sets", type=int, default=4,
                   help="with --outputs: disjoint query sets, one per endpoint tested "
                        "(default %(default)s)")
    p.add_argument("--eps", type=float, default=QuerySettings.eps,
                   help="with --outputs: L-inf radius in [0, 1] pixel units (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="with --outputs: derivation seed")
    p.add_argument("--owner", required=True, help="owner identity the watermark is bound to")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS,
                   help="watermark length N in [16, 8192]")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA,
                   help="pull towards the random anchor")
    p.add_argument("--reference", action="append", default=[],
                   help="an unrelated model of the same architecture (repeatable); with "
                        f"--outputs at least {MIN_REFERENCES} independently trained models "
                        "of at least two architectures")
    p.add_argument("--probes", type=int, default=DEFAULT_PROBES,
                   help=f"white-box key: alignment probes the key carries, at most {MAX_PROBES} "
                        "(default %(default)s); the aligned test needs them, and each is one "
                        "more input the key server runs at Register and every Verify (fewer "
                        "for a large model: docs/huggingface.md); 0: no aligned test")
    p.add_argument("--out", required=True, help="key file to write (mode 0600)")
    add_json(p)
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("extract", help="extract the watermark from a suspect and judge it")
    p.add_argument("--model", help="suspect: .pt2, Hugging Face checkpoint "
                   "directory or .onnx")
    p.add_argument("--endpoint", metavar="URL", help="output keys: ask a live Open Inference "
                   "Protocol v2 endpoint (http://host:port) instead of a local file")
    p.add_argument("--endpoint-model", metavar="NAME", help="the served model's name (default: "
                   "read from an --endpoint URL ending in /v2/models/NAME)")
    p.add_argument("--weights", help="optional .safetensors applied to the model's architecture, "
                   "or a llama.cpp .gguf read in the architecture of --model HOST_DIR")
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter directory "
                   "merged into --model BASE_DIR (a checkpoint directory)")
    p.add_argument("--onnx-tensor", help="ONNX suspects: the key layer's tensor name (default: "
                   "found from the layer's module name)")
    p.add_argument("--key", required=True, help="key bundle .fmk, or an output key")
    p.add_argument("--labels-only", action="store_true",
                   help="output keys: read only the model's top-1 labels, as from an API "
                        "that returns labels")
    p.add_argument("--set", type=int, default=0, help="output keys: the query set to ask")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level")
    p.add_argument("--reference", action="append", default=[], metavar="R.pt2",
                   help="an independently trained model of the host's architecture (repeat; "
                        "3 or more add the aligned test; run in this process: trusted files only)")
    add_json(p)
    p.set_defaults(handler=_cmd_extract)
