"""The whole freemark story on one machine, end to end, as a user would run it.

1. Start the trusted third party on its embedded defaults (SQLite, keys created on first start).
2. Add an owner (Alice) and an arbiter; each gets a bearer token.
3. Alice trains a CNN on scikit-learn's digits, exports it and derives a secret key (no weight
   changes); she also trains five independent models of the same architecture, her reference
   panel, which calibrates the aligned test against relabelled copies.
4. Alice registers key, model and panel with the TTP and receives a signed, logged receipt.
5. Mallory steals the model, fine-tunes it, prunes 30 % of its weights, then relabels the key
   layer's units and pads it with 16 split units (function unchanged; the plain test is blind
   to it). Bob trains his own.
6. The arbiter files both disputes; the TTP runs each suspect in its sandbox and signs verdicts.
7. Everyone can check receipt and verdicts offline with the TTP's public key.

Run: `make demo` (or `python examples/demo.py [--workdir DIR] [--json]`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from freemark.cli.display import print_rows
from freemark.formats.pt2 import save_program
from freemark.scheme.triggers import save_triggers, select_triggers
from freemark_lab import data, models, tasks, train
from freemark_lab.attacks import obfuscate

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SEEDS = (101, 102, 103, 104, 105)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMARK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT / "keyserver"), str(ROOT / "lab")])
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run one CLI command with --json and return its JSON object (exit on failure)."""
    result = subprocess.run([sys.executable, "-m", *args, "--json"], check=False, capture_output=True,
                            text=True, env=env or _env())
    if result.returncode != 0:
        sys.exit(f"demo: `{' '.join(args[:3])}` failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _step(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def _models(folder: Path) -> dict[str, float]:
    """Train Alice's host and panel, Mallory's stolen copy and Bob's model; export each as .pt2."""
    ds = data.digits()
    task = tasks.ImageTask(ds)
    host = train.trained(models.DigitsCNN, ds.x_train, ds.y_train, epochs=30, seed=1)
    stolen = train.train(copy.deepcopy(host), ds.x_train, ds.y_train, epochs=10, seed=7)
    weights = [m.weight for m in stolen.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(0.3)
    with torch.no_grad():
        for w in weights:
            w[w.abs() <= threshold] = 0.0
    # The thief's free step: relabel the key layer's units and pad it with split copies.
    stolen = obfuscate.permute_units(
        obfuscate.add_dummy_units(stolen, task, count=16, mode="split", seed=3), task, seed=5)
    bob = train.trained(models.DigitsCNN, ds.x_train, ds.y_train, epochs=30, seed=42)
    accuracy = {}
    for name, model in (("alice", host), ("mallory", stolen), ("bob", bob)):
        save_program(model, (torch.zeros(2, 1, 8, 8),), folder / f"{name}.pt2")
        accuracy[name] = train.accuracy(model, ds.x_test, ds.y_test)
    for seed in REFERENCE_SEEDS:
        reference = train.trained(models.DigitsCNN, ds.x_train, ds.y_train, epochs=30, seed=seed)
        save_program(reference, (torch.zeros(2, 1, 8, 8),), folder / f"reference{seed}.pt2")
    save_triggers(folder / "triggers.npz", select_triggers(ds.x_train, ds.y_train, per_class=10))
    return accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", help="keep files here (default: a temp dir, removed)")
    parser.add_argument("--port", type=int, default=0, help="TTP port (default: a free one)")
    parser.add_argument("--json", action="store_true", help="print the verdicts as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="freemark-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "ttp-data"
    port = args.port or _free_port()
    address = f"127.0.0.1:{port}"

    _step("training Alice's digits CNN and her 5-model reference panel, Mallory's stolen copy "
          "(fine-tuned, 30 % pruned, units relabelled, 16 split units), Bob's own")
    accuracy = _models(work)
    _step(f"starting the TTP on {address} (embedded defaults in {data_dir})")
    # The demo shows the arbiter every statistic behind a verdict; a production TTP keeps the
    # default `--arbiter-disclosure coarse` (outcome and p-value bucket only).
    server = subprocess.Popen([sys.executable, "-m", "freemark_keyserver.cli", "serve",
                               "--data-dir", str(data_dir), "--listen", address,
                               "--arbiter-disclosure", "full"],
                              env=_env(), stderr=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening on ..." once ready
        tokens = {name: str(_run(["freemark_keyserver.cli", "principal", "add", "--data-dir",
                                  str(data_dir), "--name", name, "--role", role])["token"])
                  for name, role in (("alice", "owner"), ("arbiter", "arbiter"))}
        alice = _env(FREEMARK_SERVER=address, FREEMARK_TOKEN=tokens["alice"])
        arbiter = _env(FREEMARK_SERVER=address, FREEMARK_TOKEN=tokens["arbiter"])

        _step("Alice derives her secret key (weights untouched) and registers it with her panel")
        _run(["freemark.cli", "keygen", "--model", str(work / "alice.pt2"), "--layer", "act",
              "--triggers", str(work / "triggers.npz"), "--owner", "alice",
              "--out", str(work / "alice.fmk")])
        panel = [arg for seed in REFERENCE_SEEDS
                 for arg in ("--reference", str(work / f"reference{seed}.pt2"))]
        receipt = _run(["freemark.cli", "register", "--key", str(work / "alice.fmk"),
                        "--model", str(work / "alice.pt2"), *panel], env=alice)
        (work / "receipt.json").write_text(json.dumps(receipt))

        _step("the arbiter files disputes against Mallory's and Bob's models")
        verdicts = {}
        for suspect in ("mallory", "bob"):
            verdicts[suspect] = _run(["freemark.cli", "verify", "--registration",
                                      str(receipt["registration_id"]), "--model",
                                      str(work / f"{suspect}.pt2")], env=arbiter)
            (work / f"verdict-{suspect}.json").write_text(json.dumps(verdicts[suspect]))

        _step("checking the receipt and both verdicts offline with the TTP's public key")
        subprocess.run([sys.executable, "-m", "freemark.cli", "public-key", "--out",
                        str(work / "ttp.pem")], env=alice, check=True, capture_output=True)
        offline = {}
        for name in ("receipt", "verdict-mallory", "verdict-bob"):
            check = subprocess.run([sys.executable, "-m", "freemark.cli", "receipt", "verify",
                                    str(work / f"{name}.json"), "--public-key", str(work / "ttp.pem")],
                                   env=_env(), check=False, capture_output=True, text=True)
            offline[name] = check.returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    rows = [_row(who, accuracy[who], v) for who, v in verdicts.items()]
    if args.json:
        print(json.dumps({"registration_id": receipt["registration_id"], "verdicts": verdicts,
                          "accuracy": accuracy, "offline_checks": offline}))
    else:
        print(f"\nregistration {receipt['registration_id']} (log index {receipt['log_index']}), "
              f"host accuracy {accuracy['alice']:.3f}\n")
        print_rows(["suspect", "test acc", "BER", "p plain", "aligned units", "p aligned",
                    "p (combined)", "outcome"], rows)
        checks = ", ".join(f"{k}: {'OK' if ok else 'FAILED'}" for k, ok in offline.items())
        print(f"\noffline checks (signature, log inclusion): {checks}")
        if args.workdir:
            print(f"files kept in {work}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    correct = verdicts["mallory"]["outcome"] == "match" and verdicts["bob"]["outcome"] == "no_match"
    return 0 if correct and all(offline.values()) else 1


def _row(who: str, accuracy: float, verdict: dict[str, Any]) -> list[object]:
    """One table row: the plain test, the aligned test and the signed decision."""
    tests = {t["name"]: t for t in verdict["tests"]}
    aligned = tests.get("aligned")
    return [who, accuracy, verdict["ber"], tests["plain"]["p_value"],
            f"{aligned['statistic']:.0f}/{aligned['n']}" if aligned else "-",
            aligned["p_value"] if aligned else "-", verdict["p_value"], verdict["outcome"]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(demo took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
