"""Independent hosts, shared keys and key server replicas, for the scale-out tests.

The replica, crash and load tests need many registrations, and a registration needs a host no
earlier registration claims. `build_hosts` makes them cheaply: digits CNNs with fresh random
weights (independent by construction) and each a different hidden width. They are one
architecture family (same weight names), so the claim check reads each new host with every
earlier key; an earlier key refuses to read a layer of another width without a panel, so those
checks stop at the width check.

`in_process_sandbox` answers what the sandbox answers, by calling the sandbox worker's own
loading, vetting and capture code in this process: the tests that use it are about storage,
ordering and load, not isolation (tests/unit/keyserver/sandbox/test_sandbox.py covers that), and a
real worker costs 2-3 s of CPU per run to import torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from freemark.derive import derive_key
from freemark.formats.pt2 import save_program
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import (
    DEFAULT_MAX_CONCURRENT_RPCS,
    MASTER_KEY_ENV,
    SIGNING_KEY_ENV,
    UNLIMITED,
    ServerConfig,
)
from freemark_keyserver.crypto import load_or_create_keyring, load_or_create_signing_key
from freemark_keyserver.sandbox.protocol import Refusal, _refusal
from freemark_keyserver.sandbox.runner import (
    LayerScan,
    ModelIdentity,
    SandboxResult,
    Then,
    TriggerRun,
)
from freemark_keyserver.sandbox.worker import _runner, _Scan, _scan_together
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal, open_store
from freemark_lab import data, models

N_HOSTS = 8
FIRST_WIDTH = 64  # hidden units of host 0; host i has FIRST_WIDTH + 4 i
ARBITER = "judge"

# torch.export.load keeps global state while it deserialises ("_CURRENT_DESERIALIZER is
# already set" from a second thread): the real sandbox runs each model in its own process, so
# in one process, runs take turns.
_SANDBOX_TURN = threading.Lock()


@dataclass(frozen=True)
class Host:
    """One independent host: its program, the same weights as .safetensors, its owner's key."""

    owner: str
    model: Path
    weights: Path
    bundle: KeyBundle


def build_hosts(folder: Path, count: int = N_HOSTS) -> list[Host]:
    """`count` independent hosts, host i owned by ``owner{i}`` (about 0.5 s each)."""
    digits = data.digits()
    triggers = select_triggers(digits.x_train, digits.y_train, per_class=10, seed=0)
    example = (torch.zeros(2, 1, 8, 8),)
    hosts = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        model = models.DigitsCNN(hidden=FIRST_WIDTH + 4 * i)
        program = save_program(model, example, folder / f"host{i}.pt2")
        weights = folder / f"host{i}.safetensors"
        save_file({k: v.contiguous() for k, v in program.state_dict.items()}, str(weights))
        owner = f"owner{i}"
        bundle = derive_key(model, layer="act", triggers=triggers, owner=owner)
        hosts.append(Host(owner, folder / f"host{i}.pt2", weights, bundle))
    return hosts


def in_process_sandbox(model_path: Path, *, layer: str, pooling: int, triggers: TriggerSet,
                       weights_path: Path | None = None, probes: int = 0,
                       **_limits: Any) -> SandboxResult:
    """`sandbox.run_model`'s answer, computed in this process by the worker's own code."""
    identity, results = in_process_batch(model_path, [TriggerRun(layer, pooling, triggers,
                                                                 probes)],
                                         weights_path=weights_path)
    if isinstance(results[0], Exception):
        raise results[0]
    return SandboxResult(results[0], identity)


def in_process_batch(model_path: Path, runs: Sequence[TriggerRun], *,
                     weights_path: Path | None = None, then: Then | None = None,
                     options: dict[str, Any] | None = None,
                     **_limits: Any) -> tuple[ModelIdentity, list[np.ndarray | Exception]]:
    """`sandbox.run_batch`'s answer (one load, `then`'s follow-up runs included), computed
    in this process by the worker's own code; `options` name the upload's format as they do
    for the sandbox (`formats.sandbox_options`)."""
    def spec(run: TriggerRun) -> dict[str, Any]:
        return {"layer": run.layer, "pooling": run.pooling, "probes": run.probes,
                "width": run.width}

    header = {**(options or {}), "model": str(model_path),
              "weights": str(weights_path) if weights_path else None,
              "sets": [spec(r) for r in runs]}
    with _SANDBOX_TURN:
        raw, read = _runner(header, [(r.triggers.inputs, r.triggers.attention_mask)
                                     for r in runs])
    identity = ModelIdentity.from_bytes(raw)

    def each(batch: Sequence[TriggerRun]) -> list[np.ndarray | Exception]:
        results: list[Any] = [None] * len(batch)  # every place is filled below
        scans = []  # the worker reads a batch's scans in one pass (`_scan_together`)
        for place, run in enumerate(batch):
            try:
                with _SANDBOX_TURN:
                    reading = read(spec(run))
                    if isinstance(reading, _Scan):
                        scans.append((place, reading, run.triggers))
                        continue
                    answer = reading(run.triggers)
                # a scan keeps its type (`LayerScan`: the tensors' widths), as decode_reply gives
                # it (an ONNX or Hugging Face scan: its loader's own run)
                results[place] = (answer.astype(np.float64) if isinstance(answer, LayerScan)
                                  else np.asarray(answer, dtype=np.float64))
            except Exception as exc:  # noqa: BLE001 - a set fails alone, as in the sandbox
                results[place] = exc
        with _SANDBOX_TURN:
            scanned = _scan_together(scans)
        for place, answer in scanned:
            # a scan keeps its type (`LayerScan`: the tensors' widths), as decode_reply gives
            # it; a refusal becomes the parent's exception, as decode_reply makes it
            results[place] = (_refusal(answer.kind, str(answer)) if isinstance(answer, Refusal)
                              else answer.astype(np.float64))
        return results

    results = each(runs)
    while then is not None and (more := list(then(identity, results))):
        results = results + each(more)
    return identity, results


@dataclass(frozen=True)
class SharedKeys:
    """The master keyring and signing key every replica of one deployment shares, as files."""

    master_key_file: Path
    signing_key_file: Path
    public_key_pem: bytes

    def cli_args(self) -> list[str]:
        return ["--master-key-file", str(self.master_key_file),
                "--signing-key-file", str(self.signing_key_file)]

    def env(self) -> dict[str, str]:
        """The same keys as environment variables (the other way to hand them to a replica)."""
        return {MASTER_KEY_ENV: self.master_key_file.read_text().strip(),
                SIGNING_KEY_ENV: self.signing_key_file.read_text()}


def shared_keys(folder: Path) -> SharedKeys:
    """Create a deployment's keys once, 0600, as an operator would before starting replicas."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    load_or_create_keyring(folder / "master.key")
    signer = load_or_create_signing_key(folder / "signing.pem")
    return SharedKeys(folder / "master.key", folder / "signing.pem", signer.public_key_pem())


def start_replica(db: str, data_dir: Path, keys: SharedKeys, **options: Any) -> RunningServer:
    """An in-process replica on `db` with the shared keys and the in-process sandbox."""
    # A fleet test loads the server through many clients that share the arbiter's token: its
    # subject is throughput and consistency, not the per-principal limits (tested on their own
    # in test_keyserver_streams.py), so those are lifted unless a test sets them.
    options = {"verify_rate_principal": UNLIMITED, "verify_rate_registration": UNLIMITED,
               "register_rate_principal": UNLIMITED,
               "max_calls_per_principal": DEFAULT_MAX_CONCURRENT_RPCS, **options}
    config = ServerConfig(data_dir=data_dir, db=db, listen="127.0.0.1:0",
                          master_key_file=keys.master_key_file,
                          signing_key_file=keys.signing_key_file, grace_seconds=1, **options)
    running = create_server(config)
    running.ctx.sandbox, running.ctx.batch = in_process_sandbox, in_process_batch
    return running


def add_principals(db: str, roles: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Add principals straight to the database; return their tokens by name."""
    store = open_store(db)
    tokens = {}
    try:
        for name, role in roles:
            tokens[name] = new_token()
            store.add_principal(Principal(name, role, hash_token(tokens[name]),
                                          time.time_ns() // 1000))
    finally:
        store.close()
    return tokens


def fleet_principals(hosts: list[Host]) -> list[tuple[str, str]]:
    """Each host's owner, and one arbiter."""
    return [(host.owner, "owner") for host in hosts] + [(ARBITER, "arbiter")]
