"""The registry at hub scale (issue 21): the log's append rate and Register against K earlier
registrations of one family, in one run, as ratios to floors measured in the same run.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/registry.py --json out/bench_registry.json
    ... bench/registry.py --quick      # K up to 10,000: under 15 minutes once its models are cached
    ... bench/registry.py --only appends --log-rounds 7   # the log section (a) alone

(tests/ on the path: the throwaway PostgreSQL of tests/pg.py and the statement bodies of
tests/signed_statements.py.) Sections:

(a) log appends per second through the real append path (`append_entry`: the sequencer's
    group commit, statement signature, ledger, checkpoint in the same transaction, then the
    inclusion proof a receipt carries), from 1 and from 16 client threads, on SQLite and on
    PostgreSQL, against a bare loop of one-row INSERT transactions into the same database:
    LOG_ROUNDS rounds (--log-rounds), each of LOG_SLICES slices of the bare loop and the log
    alternating, so that load others put on the machine weighs on both alike; each ratio is
    taken within its round, the median round's reported with the range and each round's
    load, and beside them this process's CPU per bare INSERT and per append at 16 clients
    (every thread's: the log's rate on a busy machine follows it, the bare loop's is mostly
    waiting). `--only appends` runs this section alone (a minute or two).
    The test PostgreSQL runs with fsync off (tests/pg.py), for the bare loop and the log alike.
(b) Register of one more digits CNN (the real server, the real sandbox for the upload) against
    a store holding K = 1, 1,000, 10,000 (and 100,000 without --quick) earlier registrations of
    its family: the first is real (the index group's anchor); the rest are synthetic records
    inserted through the store in batches (tests/registry_fill.py: signed receipts, the
    anchor's sealed bundle, sealed claim signatures near real independent models'). K = 1 and
    K = 10,000 in PAIRS of one upload each, back to back (K = 1 on a fresh server holding the
    anchor only), the ratio the median pair's. Also: the index's memory per registration and
    its rebuild time from the store, and the load average at each K.
(c) recall of the indexed prior-claim check against the full one on a labelled set, with the
    index at its largest K: 5 hosts registered with a panel of 5 independent models x 10 copies (fine-tuned, 50 % pruned, int8,
    fp16, relabelled, rescaled, 16 random / zero / split dummy units, renamed + relabelled
    fine-tune) and 50 independently trained models. The full check judges every tensor with
    every earlier key; the indexed one only the candidates the index names. False candidates:
    registered hosts named for an upload they do not claim.

Models are trained here and cached by recipe hash (safetensors state dicts) under
$FREEMARK_BENCH_CACHE (default out/cache/registry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import torch
from _table import print_table, write_json
from safetensors.torch import load_file, save_file
from torch import nn

import scheme_models as sm
from freemark.derive import derive_key
from freemark.errors import InvalidInputError
from freemark.records.types import VERDICT_KIND
from freemark.rpc import KeyServiceClient
from freemark.scheme.activations import capture_every
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.probes import with_probes
from freemark.tlog.signatures import canonical_json
from freemark_keyserver import claims
from freemark_keyserver.config import DEFAULT_MAX_CONCURRENT_RPCS, UNLIMITED, ServerConfig
from freemark_keyserver.crypto import MasterKeyring, SigningKey
from freemark_keyserver.handlers import panels
from freemark_keyserver.handlers.context import (
    Context,
    append_entry,
    inclusion_proof,
)
from freemark_keyserver.handlers.lookups import lookup
from freemark_keyserver.handlers.scans import judge_tensor, scan_run
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Registration, open_store
from freemark_lab.attacks.obfuscate import add_dummy_units, permute_units, rescale_units
from freemark_lab.attacks.prune import magnitude_prune
from freemark_lab.attacks.quantize import fp16, int8
from pg import PostgresServer, PostgresUnavailable, create_database
from registry_fill import fill, key_signature
from signed_statements import verdict_body
from ttp_fleet import add_principals

TASK = "digits"
QUICK_KS = (1, 1_000, 10_000)
FULL_KS = (*QUICK_KS, 100_000)
LOG_CLIENTS = 16
LOG_APPENDS = 1_000
BARE_INSERTS = 1_000
LOG_ROUNDS = 5
LOG_SLICES = 8  # bare and log slices alternating within a round
RATIO_K = 10_000
PAIRS = 3  # uploads registered at K = 1 and at K = RATIO_K, back to back
PAIR_SEED = 701
UPLOAD_SEED = 720
HOSTS = 5
PANEL = 5  # reference models per registered host
INDEPENDENTS = 50
INDEPENDENT_EPOCHS = 10  # a third of the hosts' budget: 50 of them train in minutes
GOAL_LOG = 0.5
GOAL_REGISTER = 2.0
CACHE = Path(os.environ.get("FREEMARK_BENCH_CACHE", "out/cache/registry"))


# --- models, cached by recipe ----------------------------------------------------------------


def _cached(recipe: dict[str, Any], make: Callable[[], nn.Module]) -> nn.Module:
    """The model a recipe makes, trained once and then loaded from its state dict."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
    path = CACHE / f"{digest}.safetensors"
    task = sm.task(TASK)
    if path.exists():
        model = task.lab.new_model("same", 0)
        model.load_state_dict(load_file(path))
        return model.eval()
    model = make()
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.eval()


def trained(seed: int, epochs: int | None = None) -> nn.Module:
    """A digits CNN trained from `seed` (the tests' recipe unless `epochs` says otherwise)."""
    task = sm.task(TASK)
    epochs = task.recipe.epochs if epochs is None else epochs
    recipe = {"task": TASK, "arch": "same", "seed": seed, "epochs": epochs, "lr": 1e-3}
    return _cached(recipe, lambda: task.lab.fit(task.lab.new_model("same", seed),
                                                epochs=epochs, lr=1e-3, seed=seed))


def finetuned(seed: int) -> nn.Module:
    from freemark_lab.attacks.finetune import finetune

    task = sm.task(TASK)
    recipe = {"task": TASK, "arch": "same", "seed": seed, "epochs": task.recipe.epochs,
              "lr": 1e-3, "finetune": task.recipe.finetune_epochs, "finetune_seed": 7}
    return _cached(recipe, lambda: finetune(trained(seed), task.lab,
                                            epochs=task.recipe.finetune_epochs, lr=1e-3, seed=7))


class Renamed(nn.Module):
    """Every module of a digits CNN under another name (the scan reads tensors, not names)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.body, self.squash, self.proj, self.gate, self.classify = (
            source.features, nn.Flatten(), source.fc1, nn.ReLU(), source.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.gate(self.proj(self.squash(self.body(x)))))


def copies(seed: int) -> dict[str, nn.Module]:
    """Ten stolen copies of host `seed`, by the lab's attack functions."""
    lab, host = sm.task(TASK).lab, trained(seed)
    return {
        "fine-tuned": finetuned(seed), "pruned 50%": magnitude_prune(host, lab, rate=0.5),
        "int8": int8(host, lab), "fp16": fp16(host, lab),
        "relabelled": permute_units(host, lab, seed=seed),
        "rescaled": rescale_units(host, lab, seed=seed),
        "16 random units": add_dummy_units(host, lab, count=16, mode="random"),
        "16 zero units": add_dummy_units(host, lab, count=16, mode="zero"),
        "16 split units": add_dummy_units(host, lab, count=16, mode="split"),
        "renamed, relabelled fine-tune": Renamed(permute_units(finetuned(seed), lab, seed=seed)),
    }


# --- (a) the log ------------------------------------------------------------------------------


def _statement(index: int, now: int) -> bytes:
    return canonical_json(verdict_body(index, integrated_time=now))


class BareLoop:
    """A bare loop of one-row INSERT transactions into a table of its own in the same
    database, on one connection kept open, so that it can run in slices between the log's."""

    def __init__(self, db: str) -> None:
        self._entry, self._index = _statement(0, 0), 0
        self._pg = db.startswith("postgresql://")
        if self._pg:
            self._conn: Any = psycopg.connect(db, autocommit=True)
            self._conn.execute("CREATE TABLE bare (idx BIGINT PRIMARY KEY, entry BYTEA NOT NULL)")
            return
        self._conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        # The store's own settings: WAL, a durable commit.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE bare (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL)")

    def run(self, count: int) -> float:
        """Seconds for `count` more one-row transactions."""
        started = time.perf_counter()
        for index in range(self._index, self._index + count):
            if self._pg:
                self._conn.execute("INSERT INTO bare VALUES (%s, %s)", (index, self._entry))
            else:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("INSERT INTO bare VALUES (?, ?)", (index, self._entry))
                self._conn.execute("COMMIT")
        self._index += count
        return time.perf_counter() - started

    def close(self) -> None:
        self._conn.close()


def log_appends(ctx: Context, count: int, clients: int) -> float:
    """Seconds for `count` statements through append_entry and the receipt's inclusion
    proof, from `clients` threads that each append their share in a loop (plain threads,
    started together: no executor's per-call hand-off is timed)."""
    start = threading.Barrier(clients + 1)
    failed: list[BaseException] = []

    def client(share: int) -> None:
        start.wait()
        try:
            for _ in range(share):
                _, index, _ = append_entry(ctx, VERDICT_KIND, _statement)
                inclusion_proof(ctx, index)
        except BaseException as exc:  # a failed append fails the bench, not just its thread
            failed.append(exc)
            raise

    threads = [threading.Thread(target=client, args=(count // clients + (n < count % clients),))
               for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return time.perf_counter() - started


def log_round(ctx: Context, bare: BareLoop, appends: int) -> dict[str, Any]:
    """One round: LOG_SLICES slices, each a slice of the bare loop and then a slice of
    LOG_CLIENTS-client appends, then the same for one client; each rate from its summed
    slices, so load that comes and goes weighs on the log and its floor alike. Also each
    kind's fastest slice: others' load only ever slows a slice down, so the ratio of the
    fastest ones is the one they disturb least."""
    seconds: dict[str, list[float]] = {"bare": [], "many": [], "bare_one": [], "one": []}
    per_slice = {"bare": BARE_INSERTS // LOG_SLICES, "many": appends // LOG_SLICES,
                 "bare_one": BARE_INSERTS // (4 * LOG_SLICES), "one": appends // (4 * LOG_SLICES)}
    cpu = {"bare": 0.0, "many": 0.0}  # this process's CPU (every thread), summed over slices
    for _ in range(LOG_SLICES):
        mark = time.process_time()
        seconds["bare"].append(bare.run(per_slice["bare"]))
        cpu["bare"], mark = cpu["bare"] + time.process_time() - mark, time.process_time()
        seconds["many"].append(log_appends(ctx, per_slice["many"], LOG_CLIENTS))
        cpu["many"] += time.process_time() - mark
    for _ in range(LOG_SLICES):
        seconds["bare_one"].append(bare.run(per_slice["bare_one"]))
        seconds["one"].append(log_appends(ctx, per_slice["one"], 1))
    rates = {what: LOG_SLICES * per_slice[what] / sum(s) for what, s in seconds.items()}
    fastest = {what: per_slice[what] / min(s) for what, s in seconds.items()}
    return {"bare": rates["bare"], "many": rates["many"], "one": rates["one"],
            "many_ratio": rates["many"] / rates["bare"],
            "one_ratio": rates["one"] / rates["bare_one"],
            "fastest_many_ratio": fastest["many"] / fastest["bare"],
            "cpu_us_bare": 1e6 * cpu["bare"] / (LOG_SLICES * per_slice["bare"]),
            "cpu_us_many": 1e6 * cpu["many"] / (LOG_SLICES * per_slice["many"]),
            "load": os.getloadavg()[0]}


def log_section(folder: Path, pg_admin: str | None, quick: bool, rounds: int = LOG_ROUNDS
                ) -> dict[str, Any]:
    """Each backend in `rounds` rounds of interleaved slices (`log_round`); each ratio is
    taken within its round, and the median round's reported with the median rates, the
    ratios' spread and the load average at the end of each round."""
    appends = LOG_APPENDS // (2 if quick else 1)
    databases = {"sqlite": str(folder / "log.sqlite3")}
    if pg_admin:
        databases["postgres"] = create_database(pg_admin, "benchlog")
    measured: dict[str, list[dict[str, Any]]] = {}
    for backend, db in databases.items():
        store = open_store(db)
        bare = BareLoop(db)
        ctx = Context(config=ServerConfig(data_dir=folder, db=db), store=store,
                      keyring=MasterKeyring({1: os.urandom(32)}), signer=SigningKey.generate())
        try:
            log_appends(ctx, LOG_CLIENTS, LOG_CLIENTS)  # warm: connections, ledger
            bare.run(LOG_SLICES)
            measured[backend] = [log_round(ctx, bare, appends) for _ in range(rounds)]
        finally:
            bare.close()
            store.close()
    result: dict[str, Any] = {
        what: {b: statistics.median(r[what] for r in measured[b]) for b in databases}
        for what in ("bare", "one", "many", "one_ratio", "many_ratio", "fastest_many_ratio",
                     "cpu_us_bare", "cpu_us_many")}
    result["many_ratio_range"] = {b: (min(r["many_ratio"] for r in measured[b]),
                                      max(r["many_ratio"] for r in measured[b]))
                                  for b in databases}
    result["rounds"] = measured
    rows = [[b, number + 1, r["bare"], r["one"], r["one_ratio"], r["many"], r["many_ratio"],
             r["fastest_many_ratio"], r["cpu_us_bare"], r["cpu_us_many"], r["load"]]
            for b in databases for number, r in enumerate(measured[b])]
    rows += [[b, "median", result["bare"][b], result["one"][b], result["one_ratio"][b],
              result["many"][b], result["many_ratio"][b], result["fastest_many_ratio"][b],
              result["cpu_us_bare"][b], result["cpu_us_many"][b], "-"]
             for b in databases]
    print_table(f"(a) log appends per second vs a bare one-row INSERT loop (goal >= {GOAL_LOG}x; "
                f"{rounds} rounds of {LOG_SLICES} interleaved slices, each ratio within its "
                "round)",
                ["backend", "round", "bare/s", "1 client/s", "ratio", f"{LOG_CLIENTS} clients/s",
                 "ratio", "fastest slices' ratio", "CPU µs/insert", "CPU µs/append",
                 "load 1 min"], rows)
    return result


def _load() -> str:
    """The 1, 5 and 15 minute load averages: a shared machine's figures need them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- (b) Register against K earlier registrations ---------------------------------------------


class Registry:
    """A real key server (real sandbox) on SQLite, and the principals of the bench."""

    def __init__(self, folder: Path) -> None:
        config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=1,
                              verify_rate_principal=UNLIMITED,
                              verify_rate_registration=UNLIMITED,
                              register_rate_principal=UNLIMITED,
                              max_calls_per_principal=DEFAULT_MAX_CONCURRENT_RPCS)
        self.running: RunningServer = create_server(config)
        self.ctx = self.running.ctx
        owners = ["anchor", "uploader", *(f"host{i}" for i in range(HOSTS))]
        self.tokens = add_principals(config.database, [(o, "owner") for o in owners])
        self.example = sm.task(TASK).lab.sample_inputs(2)
        self.folder = folder

    def register(self, owner: str, label: str, model: nn.Module, seed: int,
                 references: Sequence[Path] = ()) -> tuple[str, float]:
        """Register `model` as `owner` (a key on `act`, with a reference panel); the id and
        the call's seconds."""
        bundle = derive_key(model, layer="act", triggers=sm.task(TASK).lab.triggers(10, seed),
                            owner=owner)
        path = self.export(label, model)
        with KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[owner],
                              timeout=1800) as client:
            started = time.perf_counter()
            receipt = client.register(bundle, path, references=references)
            return receipt.registration_id, time.perf_counter() - started

    def export(self, label: str, model: nn.Module) -> Path:
        from freemark.formats.pt2 import save_program

        path = self.folder / f"{label}.pt2"
        save_program(model, self.example, path)
        return path


def signatures_on(model: nn.Module, anchor_triggers: Any) -> list[np.ndarray]:
    """Every tensor's claim signature on a group's probes, as the sandbox child reads them."""
    scans = capture_every(model, with_probes(anchor_triggers, claims.PROBES))
    found = (claims.signature(claims.probe_rows(m)) for _, m in scans)
    return [v for v in found if v is not None]


def k1_register(folder: Path, model: nn.Module, seed: int) -> float:
    """Seconds of one Register of `model` on a fresh server holding only the anchor: K = 1."""
    fresh = Registry(folder)
    try:
        fresh.register("anchor", "anchor", trained(900), seed=900)
        return fresh.register("uploader", "upload", model, seed=seed)[1]
    finally:
        fresh.running.stop(0)


def register_section(registry: Registry, ks: Sequence[int]) -> dict[str, Any]:
    """Register against K earlier registrations. K = 1 and K = 10,000 are measured in PAIRS
    of one upload, registered on a fresh server holding only the anchor and then on the
    bench's server holding 10,000: each pair back to back, so the load others put on the
    machine weighs on both alike; the ratio is the median pair's. Every other K: one
    upload."""
    ctx = registry.ctx
    anchor_id, _ = registry.register("anchor", "anchor", trained(900), seed=900)
    anchor = lookup(ctx, anchor_id)
    assert anchor is not None
    anchor_bundle, _ = panels.open_sealed(ctx, anchor)
    bases = [key_signature(trained(seed), anchor_bundle.triggers) for seed in (901, 902)]
    times: dict[str, list[float]] = {}
    rebuild: dict[str, float] = {}
    memory: dict[str, float] = {}
    loads: dict[str, str] = {}
    inserted, upload = 0, 0
    for k in (k for k in ks if k > 1):
        earlier = ctx.store.tree_size()
        started = time.perf_counter()
        fill(ctx, anchor, k - earlier, bases, inserted, owner="anchor")
        inserted += k - earlier
        insert_s = time.perf_counter() - started
        started = time.perf_counter()
        fresh = claims.ClaimIndex(ctx.keyring)
        fresh.refresh(ctx.store)
        rebuild[str(k)] = time.perf_counter() - started
        memory[str(k)] = fresh.memory_bytes() / max(len(fresh), 1)
        # The bulk, read untimed: the ledger's check of every entry, and the server's claim
        # index decrypting every signature (a fill's cost, paid once, not a Register's).
        ctx.ledger.read(ctx.store, lambda registry: registry.size)
        ctx.claims.refresh(ctx.store)
        loads[str(k)] = _load()
        print(f"K={k}: {k - earlier} synthetic registrations inserted in {insert_s:.1f} s",
              flush=True)
        if k == RATIO_K:
            times["1"], times[str(k)] = [], []
            for pair in range(PAIRS):
                seed = PAIR_SEED + pair
                times["1"].append(k1_register(registry.folder / f"k1-{pair}", trained(seed),
                                              seed))
                times[str(k)].append(registry.register("uploader", f"pair{pair}",
                                                       trained(seed), seed=seed)[1])
            loads["1"] = loads[str(k)]
            continue
        upload += 1
        seed = UPLOAD_SEED + upload
        times[str(k)] = [registry.register("uploader", f"upload{upload}", trained(seed),
                                           seed=seed)[1]]
    seconds = {k: statistics.median(t) for k, t in sorted(times.items(), key=lambda i: int(i[0]))}
    ratio = statistics.median(b / a for a, b in zip(times["1"], times[str(RATIO_K)],
                                                    strict=True))
    rows = [[k, len(times[k]), seconds[k], seconds[k] / seconds["1"], rebuild.get(k, "-"),
             memory.get(k, "-"), loads[k]] for k in seconds]
    print_table(f"(b) Register of one more digits CNN against K earlier registrations "
                f"(goal: K=10,000 <= {GOAL_REGISTER}x K=1; median pair ratio {ratio:.2f}, "
                f"{registry.ctx.config.claim_candidates} candidates)",
                ["K", "uploads", "register s (median)", "ratio to K=1", "index rebuild s",
                 "index B/registration", "load 1/5/15 min"], rows)
    return {"seconds": seconds, "times": times, "ratio": ratio, "rebuild": rebuild,
            "memory": memory, "anchor": anchor, "loads": loads}


# --- (c) recall on a labelled set -------------------------------------------------------------


def claimed_by(ctx: Context, model: nn.Module, bundle: KeyBundle, panel: Any) -> bool:
    """The full check of one earlier key on `model`: a scan, every tensor judged."""
    run = scan_run(bundle, panel)
    inputs = with_probes(run.triggers, run.probes)
    for _, layer in capture_every(model, inputs, width=run.width):
        try:
            verdict = judge_tensor(layer, bundle, panel, run.probes)
        except InvalidInputError:  # a tensor the key cannot be read on, as Register skips
            continue
        except Exception:  # noqa: BLE001 - a failed judgement is a claim, as in Register
            return True
        if verdict.is_match:
            return True
    return False


def recall_section(registry: Registry, anchor: Registration) -> dict[str, Any]:
    ctx = registry.ctx
    hosts = {}
    # Each host's panel: five independent models (not in the labelled set), so the full check
    # runs the aligned test and catches the relabelled, rescaled and padded copies.
    panel = [registry.export(f"panel{j}", trained(3000 + j, INDEPENDENT_EPOCHS))
             for j in range(PANEL)]
    for i in range(HOSTS):
        rid, _ = registry.register(f"host{i}", f"host{i}", trained(1 + i), seed=1 + i,
                                   references=panel)
        hosts[rid] = i
    ctx.claims.refresh(ctx.store)
    keys = {rid: panels.open_sealed(ctx, lookup(ctx, rid)) for rid in [*hosts, anchor.registration_id]}
    anchor_triggers = keys[anchor.registration_id][0].triggers
    group = claims.group_of(anchor_triggers)
    labelled: list[tuple[str, int | None, nn.Module]] = []
    for rid, i in hosts.items():
        labelled += [(f"host{i} {name}", i, m) for name, m in copies(1 + i).items()]
    labelled += [(f"independent {s}", None, trained(2000 + s, INDEPENDENT_EPOCHS))
                 for s in range(INDEPENDENTS)]
    host_ids = {i: rid for rid, i in hosts.items()}
    counts = {"copies": 0, "full": 0, "indexed": 0, "false": 0, "independents_claimed": 0}
    missed: list[str] = []
    ranks: list[int] = []  # each copy's source among the index's nearest
    for label, source, model in labelled:
        full = {rid for rid, (bundle, panel) in keys.items()
                if claimed_by(ctx, model, bundle, panel)}
        # Synthetic records carry the anchor's key: the anchor's verdict is theirs.
        ranked = ctx.claims.nearest(group, signatures_on(model, anchor_triggers), k=100)
        candidates = set(ranked[:ctx.config.claim_candidates])
        if source is not None:
            ranks.append(ranked.index(host_ids[source]) + 1 if host_ids[source] in ranked
                         else len(ranked) + 1)
        synthetic_named = any(c.startswith("reg_synthetic") for c in candidates)
        indexed = {rid for rid in full if rid in candidates
                   or (rid == anchor.registration_id and synthetic_named)}
        counts["false"] += len([c for c in candidates if c in hosts and c not in full])
        if source is None:
            counts["independents_claimed"] += bool(full)
            continue
        counts["copies"] += 1
        counts["full"] += bool(full)
        counts["indexed"] += bool(indexed)
        if full and not indexed:
            missed.append(label)
        if host_ids[source] not in full:
            missed.append(f"{label} (not claimed by the full check)")
    print_table(f"(c) indexed ({ctx.config.claim_candidates} candidates) vs full prior-claim check on the "
                "labelled set",
                ["copies", "refused (full)", "refused (indexed)", "source's worst rank",
                 "independents", "claimed (full)", "false host candidates"],
                [[counts["copies"], counts["full"], counts["indexed"], max(ranks),
                  INDEPENDENTS, counts["independents_claimed"], counts["false"]]])
    if missed:
        print("not refused:", "; ".join(missed), "\n", flush=True)
    return {**counts, "missed": missed, "ranks": ranks}


# --- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K up to 10,000")
    parser.add_argument("--only", choices=["appends"],
                        help="run one section: appends, the log's (a), in a minute or two")
    parser.add_argument("--log-rounds", type=int, default=LOG_ROUNDS,
                        help=f"rounds of the log section (default {LOG_ROUNDS})")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared machine: one thread per process trains as fast
    ks = QUICK_KS if args.quick else FULL_KS
    started, load_at_start = time.perf_counter(), _load()
    postgres = PostgresServer()
    register: dict[str, Any] | None = None
    recall: dict[str, Any] = {}
    try:
        try:
            pg_admin: str | None = postgres.start()
        except PostgresUnavailable as exc:
            print(f"PostgreSQL unavailable ({exc}); SQLite only", flush=True)
            pg_admin = None
        with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
            folder = Path(tmp)
            sections: dict[str, float] = {}
            mark = time.perf_counter()
            log = log_section(folder, pg_admin, args.quick, args.log_rounds)
            sections["log"], mark = time.perf_counter() - mark, time.perf_counter()
            if args.only is None:
                registry = Registry(folder)
                try:
                    register = register_section(registry, ks)
                    sections["register"], mark = time.perf_counter() - mark, time.perf_counter()
                    recall = recall_section(registry, register["anchor"])
                    sections["recall"] = time.perf_counter() - mark
                finally:
                    registry.running.stop(0)
    finally:
        postgres.stop()
    payload: dict[str, Any] = {}
    if register is not None:
        payload.update({
            "register_seconds": register["seconds"],
            "register_ratio_10000_vs_1": register["ratio"],
            "register_times": register["times"],
            "register_load_average": register["loads"],
            "index_rebuild_seconds": register["rebuild"],
            "index_bytes_per_registration": register["memory"],
            "copies": recall["copies"],
            "copies_refused_full": recall["full"],
            "copies_refused_indexed": recall["indexed"],
            "independents": INDEPENDENTS,
            "independents_claimed_full": recall["independents_claimed"],
            "false_host_candidates": recall["false"],
            "source_ranks": recall["ranks"],
            "not_refused": recall["missed"],
            "candidates_per_register": registry.ctx.config.claim_candidates,
        })
    payload.update({
        "log_appends_per_s": log["many"],
        "log_appends_per_s_one_client": log["one"],
        "log_ratio_to_bare": log["many_ratio"],
        "log_ratio_to_bare_range": log["many_ratio_range"],
        "log_ratio_to_bare_fastest_slices": log["fastest_many_ratio"],
        "log_ratio_to_bare_one_client": log["one_ratio"],
        "log_cpu_us_per_append": log["cpu_us_many"],
        "bare_cpu_us_per_insert": log["cpu_us_bare"],
        "log_rounds": log["rounds"],
        "log_clients": LOG_CLIENTS,
        "bare_inserts_per_s": log["bare"],
        "quick": args.quick,
        "only": args.only,
        "seconds": time.perf_counter() - started,
        "load_average": {"start": load_at_start, "end": _load()},
        "section_seconds": sections,
    })
    print(f"total {payload['seconds']:.0f} s (" + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in sections.items()) + "); load average "
        f"{load_at_start} at the start, {payload['load_average']['end']} at the end", flush=True)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
