"""The output key's evidence through the product (issue 19, "What it must show"): the key
`bench/blackbox.py` derived on the real pretrained host, registered through the CLI with a
real key server, and every suspect served by a real MLServer over the Open Inference
Protocol (labels-only and score endpoints; the host behind input noise, 16-level
quantisation and a 3x3 median filter served as models by the thief's preprocessing), each
judged by `freemark verify --endpoint` and the signed verdict checked offline; then a model
FILE Verify of the large-lr fine-tune against the output key. Prints a table, writes JSON.

    # after bench/blackbox.py (the key and models come from its cache, .cache/blackbox/)
    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/blackbox_endpoint.py \\
        --json docs/blackbox-endpoint.json
    # the same plumbing on the tests' digits models, in minutes (nothing to cache first)
    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/blackbox_endpoint.py --digits

What is required (`Suspect.expect`): the copies from labels alone, and the median-filtered
host from scores, `match` at p <= 1e-9; every held-out independent `no_match` at p >= 1e-3;
the large-lr fine-tune's file `match`. The distilled students are judged in process only
(bench/blackbox.py). The exit status is 1 when a requirement is not met.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from freemark.audit.receipt import verify_receipt
from freemark.blackbox.key import save_output_key
from freemark.blackbox.queries import derive_output_key
from freemark.formats.pt2 import save_program
from freemark.records.types import EndpointVerdict, SignedVerdict
from freemark.records.wire import endpoint_verdict_from_json, verdict_from_json
from freemark.rpc import KeyServiceClient
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.server import create_server
from freemark_lab import blackbox as lab
from oip_servers import ServedModel, export_onnx, serve
from ttp_fixtures import cli_env, json_out, run_cli
from ttp_fleet import add_principals

ROOT = Path(__file__).resolve().parents[1]
OWNER = "owner@example.com"
MATCH_P, NO_MATCH_P = 1e-9, 1e-3
VERIFICATIONS_PER_SERVER = 12
Read = Literal["labels", "scores"]
Expect = Literal["match", "no_match", "report"]


@dataclass(frozen=True)
class Suspect:
    """One suspect: a model served as the thief would, read as `reads`, and what the
    issue requires of each read (`expect[read]`)."""

    name: str
    kind: str  # theft, student, independent
    model: nn.Module
    expect: dict[str, Expect]
    preprocess: Literal["noise", "quantise", "median"] | None = None


@dataclass(frozen=True)
class World:
    """What the run judges: the key (a file and its passphrase), the host and its panel as
    the owner registers them, an example input, the suspects, and the file for Verify."""

    key: Path
    passphrase: bytes
    host: nn.Module
    panel: list[nn.Module]
    example: torch.Tensor
    suspects: list[Suspect]
    file_suspects: dict[str, tuple[nn.Module, Expect]]
    source: str


def _both(labels: Expect, scores: Expect) -> dict[str, Expect]:
    return {"labels": labels, "scores": scores}


def lab_world(recipe: dict[str, Any], independents: int) -> World:
    """The MNIST run's key and models, from `bench/blackbox.py`'s cache (refused without
    it: its derivation is the long part). Independents: the first `independents` of the
    MNISTNet and MnistCNN architectures and two quarter-width ones."""
    cache = lab.Cache()
    key = lab.key_path(cache, recipe)
    if not key.exists():
        raise SystemExit(f"no key at {key}: run bench/blackbox.py with this recipe first")
    data = lab.mnist()
    host, panel = lab.pretrained_host(), lab.build_panel(data, recipe, cache, print)
    # The students are judged in process by bench/blackbox.py (nothing is required of them):
    # not trained here when that run has not made them yet.
    thefts, _ = lab.build_thefts(data, recipe, cache, print, students=False)
    # The shortest prefix of the recipe's independents holding what is judged here.
    archs, wanted = recipe["independents"], {"wide": independents, "narrow": 2}
    count = next(n for n in range(len(archs) + 1)
                 if sum(a != "student" for a in archs[:n]) >= wanted["wide"]
                 and sum(a == "student" for a in archs[:n]) >= wanted["narrow"])
    others, arch_of = lab.build_independents(data, recipe, cache, print, count)
    large = f"fine-tuned lr {recipe['finetune']['large'][0]:g}"
    suspects = [Suspect(name, "theft", model, _both("match", "report"))
                for name, model in thefts.items()
                if not name.startswith(("host behind", "distilled", "student"))]
    suspects += [
        Suspect("host behind noise", "theft", host, _both("match", "report"), "noise"),
        Suspect("host behind quantise16", "theft", host, _both("match", "report"), "quantise"),
        Suspect("host behind median3", "theft", host, _both("report", "match"), "median"),
    ]
    wide = [n for n in others if arch_of[n] != "student"][:independents]
    narrow = [n for n in others if arch_of[n] == "student"][:2]
    # Labels, the statistic every endpoint gives (their scores are judged in process).
    suspects += [Suspect(f"{name} ({arch_of[name]})", "independent", others[name],
                         {"labels": "no_match"}) for name in wide + narrow]
    return World(key, lab.LAB_PASSPHRASE, host, panel, torch.from_numpy(data.test[0][:2]),
                 suspects, {large: (thefts[large], "match"),
                            f"{wide[0]} ({arch_of[wide[0]]})": (others[wide[0]], "no_match")},
                 f"MNIST, recipe {lab.recipe_hash(recipe)}")


def digits_world(folder: Path) -> World:
    """The integration tests' digits models (tests/blackbox_models.py) and a key of one set
    of 96 queries derived here: the same plumbing in minutes."""
    import blackbox_models as bm
    from freemark_lab.train import train

    print("digits: training the host, its panel and independents, deriving the key",
          flush=True)
    x, y = bm.owner_data()
    key = derive_output_key(bm.host(), x, y, bm.panel(), owner=OWNER,
                            n_queries=96, n_sets=1, recipes=bm.RECIPES)
    passphrase = b"freemark-bench-digits"
    save_output_key(folder / "digits.fmo", key, passphrase)
    d = bm.data()
    gentle = train(copy.deepcopy(bm.host()), d.x_test, d.y_test, epochs=3, lr=1e-4, seed=6)
    suspects = [Suspect("fine-tuned lr 1e-4", "theft", gentle, _both("match", "match")),
                Suspect("host behind quantise16", "theft", bm.host(), _both("match", "report"),
                        "quantise")]
    suspects += [Suspect(f"independent {i}", "independent", m, _both("no_match", "no_match"))
                 for i, m in enumerate(bm.independents())]
    return World(folder / "digits.fmo", passphrase, bm.host(), bm.panel(),
                 torch.from_numpy(d.x_train[:2]), suspects,
                 {"fine-tuned lr 1e-4": (gentle, "match")}, "digits (tests/blackbox_models)")


def _pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    save_program(model.eval(), (example,), path)
    return path


def _groups(suspects: list[Suspect]) -> list[list[tuple[int, Suspect]]]:
    """Suspects in runs of the same kind, one MLServer each, with at most
    `VERIFICATIONS_PER_SERVER` verifications: a server start costs tens of seconds here, and
    the key server's rate limit per endpoint origin (`EndpointPolicy.rate_inputs`, 8,192
    inputs an hour; a verification sends a set, as many decoys and 32 repeats) bounds what
    one server may be asked."""
    groups: list[list[tuple[int, Suspect]]] = []
    for i, suspect in enumerate(suspects):
        last = groups[-1] if groups else []
        if (not last or last[0][1].kind != suspect.kind or sum(len(s.expect) for _, s in last)
                + len(suspect.expect) > VERIFICATIONS_PER_SERVER):
            groups.append(last := [])
        last.append((i, suspect))
    return groups


def _met(expect: Expect, outcome: str, p_value: float) -> bool | None:
    if expect == "match":
        return outcome == "match" and p_value <= MATCH_P
    if expect == "no_match":
        return outcome == "no_match" and p_value >= NO_MATCH_P
    return None


def _row(suspect: str, kind: str, read: str, verdict: EndpointVerdict | SignedVerdict,
         expect: Expect, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "suspect": suspect, "kind": kind, "read": read, "outcome": verdict.outcome,
        "log10_p": verdict.log10_p_value, "expect": expect,
        "met": _met(expect, verdict.outcome, verdict.p_value), "cli_seconds": seconds,
        "tests": {t.name: {"statistic": t.statistic, "n": t.n, "log10_p": t.log10_p_value}
                  for t in verdict.tests}}
    if isinstance(verdict, EndpointVerdict):
        row.update({"query_set": verdict.query_set, "set_reused": verdict.set_reused,
                    "set_disclosures": verdict.set_disclosures,
                    "model_version": verdict.model_version,
                    "inputs": sum(e.inputs for e in verdict.exchanges),
                    "conversation_seconds": (verdict.finished_at - verdict.started_at) / 1e6})
    return row


def run(world: World, work: Path) -> dict[str, Any]:
    """Register through the CLI, verify every suspect's endpoints and the file suspects."""
    models = work / "models"
    models.mkdir(parents=True)
    print("exporting the host and its panel", flush=True)
    host = _pt2(world.host, world.example, models / "host.pt2")
    references = [_pt2(m, world.example, models / f"reference{i}.pt2")
                  for i, m in enumerate(world.panel)]
    shape = tuple(world.example.shape[1:])
    config = ServerConfig(data_dir=work / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                          endpoint_allow=("127.0.0.1",), verify_rate_principal=UNLIMITED,
                          verify_rate_registration=UNLIMITED, register_rate_principal=UNLIMITED)
    running = create_server(config)  # the real key server: its sandbox runs every model file
    tokens = add_principals(config.database, [(OWNER, "owner")])
    env = cli_env(FREEMARK_KEY_PASSPHRASE=world.passphrase.decode(),
                  FREEMARK_SERVER=f"127.0.0.1:{running.port}", FREEMARK_TOKEN=tokens[OWNER])
    rows: list[dict[str, Any]] = []
    try:
        with KeyServiceClient(f"127.0.0.1:{running.port}", token=tokens[OWNER]) as client:
            public_key = client.public_key()
        print("registering the key", flush=True)
        began = time.perf_counter()
        receipt = json_out(run_cli(
            "freemark.cli", "register", "--key", str(world.key), "--model", str(host),
            *[a for r in references for a in ("--reference", str(r))], "--json", "--insecure",
            env=env))
        register_s = time.perf_counter() - began
        registration = str(receipt["registration_id"])
        print(f"registered {registration} in {register_s:.1f} s", flush=True)
        for g, group in enumerate(_groups(world.suspects)):
            served = []
            for i, suspect in group:
                onnx = export_onnx(copy.deepcopy(suspect.model).eval(), models / f"s{i}.onnx",
                                   shape)
                served += [ServedModel(f"s{i}-{read}", onnx, shape, 10, read,  # type: ignore[arg-type]
                                       suspect.preprocess) for read in suspect.expect]
            with serve(served, work / f"oip{g}") as oip:
                print(f"MLServer {g}: {len(served)} models ready in {oip.started_in_s:.0f} s",
                      flush=True)
                for i, suspect in group:
                    for read, expect in suspect.expect.items():
                        began = time.perf_counter()
                        out = run_cli("freemark.cli", "verify", "--registration", registration,
                                      "--endpoint", oip.url, "--endpoint-model",
                                      f"s{i}-{read}", "--json", "--insecure", env=env)
                        seconds = time.perf_counter() - began
                        verdict = endpoint_verdict_from_json(json_out(out))
                        assert isinstance(verdict, EndpointVerdict)
                        verify_receipt(verdict, public_key)  # what `receipt verify` checks
                        rows.append(_row(suspect.name, suspect.kind, read, verdict, expect,
                                         seconds))
                        print(json.dumps(rows[-1]), flush=True)
        files: list[dict[str, Any]] = []
        for name, (model, expect) in world.file_suspects.items():
            path = _pt2(model, world.example, models / f"file-{len(files)}.pt2")
            began = time.perf_counter()
            out = run_cli("freemark.cli", "verify", "--registration", registration, "--model",
                          str(path), "--json", "--insecure", env=env)
            seconds = time.perf_counter() - began
            signed = verdict_from_json(json_out(out))
            assert isinstance(signed, SignedVerdict)
            verify_receipt(signed, public_key)
            files.append(_row(name, "file", "file", signed, expect, seconds))
            print(json.dumps(files[-1]), flush=True)
    finally:
        running.stop(0)
    return {"source": world.source, "registration_seconds": register_s,
            "query_sets": len(receipt["query_sets"]), "endpoints": rows, "files": files,
            "match_p": MATCH_P, "no_match_p": NO_MATCH_P}


def render(report: dict[str, Any]) -> str:
    """The table docs/blackbox.md quotes."""
    lines = [(f"{report['source']}: registered in {report['registration_seconds']:.0f} s, "
              f"{report['query_sets']} query sets"), "",
             ("| suspect | read | outcome | log10 p | labels | scores | ranking | set | "
              "conversation s | required | met |"),
             "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|"]
    for row in report["endpoints"] + report["files"]:
        tests = [row["tests"].get(name) for name in ("labels", "scores", "ranking")]
        cells = [f"{t['statistic']:g}/{t['n']}, {t['log10_p']:.1f}" if t else ""
                 for t in tests]
        where = (f"{row['query_set']}{' (reused)' if row['set_reused'] else ''}"
                 if "query_set" in row else "all")
        took = f"{row['conversation_seconds']:.2f}" if "conversation_seconds" in row else ""
        met = {True: "yes", False: "**NO**", None: ""}[row["met"]]
        lines.append(f"| {row['suspect']} | {row['read']} | {row['outcome']} | "
                     f"{row['log10_p']:.1f} | " + " | ".join(cells)
                     + f" | {where} | {took} | {row['expect']} | {met} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(ROOT / "docs" / "blackbox-endpoint.json"))
    parser.add_argument("--quick", action="store_true",
                        help="the key of bench/blackbox.py --quick (its cache)")
    parser.add_argument("--digits", action="store_true",
                        help="the tests' digits models and a key derived here, not the MNIST run")
    parser.add_argument("--independents", type=int, default=10,
                        help="held-out independents of the MNISTNet and MnistCNN architectures "
                             "(two quarter-width ones are added)")
    args = parser.parse_args(argv)
    # One thread: on a shared, loaded machine a second one mostly waits at barriers.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="blackbox-endpoint-") as tmp:
        world = (digits_world(Path(tmp)) if args.digits else
                 lab_world(lab.QUICK if args.quick else lab.RECIPE, args.independents))
        report = run(world, Path(tmp))
    Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(render(report))
    unmet = [r for r in report["endpoints"] + report["files"] if r["met"] is False]
    for row in unmet:
        print(f"NOT MET: {row['suspect']} ({row['read']}): {row['outcome']} at log10 p "
              f"{row['log10_p']:.1f}, required {row['expect']}", file=sys.stderr)
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
