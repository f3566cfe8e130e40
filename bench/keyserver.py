"""Key server benchmark: the TTP against bare gRPC on this machine, in one run.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/keyserver.py --json out/bench_keyserver.json

(tests/ on the path: the bench reuses the tests' throwaway PostgreSQL, tests/pg.py, and their
independent hosts, tests/ttp_fleet.py.) About 7 minutes on two shared cores and 2 GB of free
disk in the temporary directory; `--quick` is a 2-3 minute smoke run (no 500 MB model, fewer
clients and requests); `--sandbox` only the warm sandbox's figures (about 4 minutes, SQLite:
pool idle memory, Register full vs TTP only, Verify against its floor). docs/keyserver-bench.md has the figures and what limits each.

Every server is a process of its own; the clients are threads of this process. Sections:

(a) floor: a bare gRPC server (bench/_servers.py) with a unary echo and a client-streaming
    sink on raw bytes: QPS and p50/p99 of the echo at 1, 8 and 32 clients, and sink throughput
    for 1 MiB chunks of the model files.
(b) Register at 1, 8 and 32 clients on SQLite and PostgreSQL, each client registering its own
    independent hosts: QPS and p50/p99, as a ratio of the echo's QPS at the same concurrency.
    "full" runs the real server and sandbox; "TTP only" the same server code with the sandbox
    answering from a recorded table (everything but the sandbox: auth, upload, judging, sealing,
    storing, logging, signing); GetCheckpoint is the cheapest authenticated call that reads
    the store.
(c) upload throughput for 10, 100 and 500 MB models through Register's upload path (spooled to
    disk, SHA-256 checked; a wrong announced checksum makes the server stop right there), as a
    ratio of the sink's.
(d) peak server RSS (sampled every 10 ms, and the kernel's high-water mark) while the 500 MB
    model is uploaded and while it is registered end to end, against size x 1.2 + 200 MB.
(e) Verify latency of the digits CNN, the wide models and EfficientNet-Lite0 (the lab's
    pretrained ImageNet CNN, freemark_lab.imagenet) split into its parts, each measured
    alone: upload (as in (c)), load (+ vetting), probes (built from the triggers, as the
    sandbox child does), forward, fingerprint, extract (the calibrated verdict) and log+sign;
    against the end-to-end Verify, and as a ratio of its floor (upload + load + forward +
    extract in process: what any TTP must do). The sandbox is the warm pool: its cost is the
    gap.
(f) 32 clients x 1,000 mixed cheap requests through two replicas on one PostgreSQL, and load
    shedding: with --max-concurrent-rpcs 4 held by slow uploads, how fast excess calls get
    RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import torch
from _servers import FLOOR_SERVICE, ReplaySandbox, file_sha256, save_replay_table
from _table import print_table, write_json
from torch import nn

from freemark.derive import check_uniqueness, derive_key
from freemark.extract import judge_activations
from freemark.formats.pt2 import load_program, save_program
from freemark.formats.pt2_vetting import vet_program
from freemark.reading import aligns, inputs, probe_count, split_activations
from freemark.scheme.activations import capture
from freemark.scheme.bundle import KeyBundle, to_proto
from freemark.scheme.probes import with_probes
from freemark.tlog import merkle
from freemark.tlog.signatures import canonical_json
from freemark.v1 import keyservice_pb2 as pb
from freemark.v1 import keyservice_pb2_grpc
from freemark.verdict.decision import suspect_vector
from freemark_keyserver.config import ServerConfig, load_keyring, load_signing_key
from freemark_keyserver.crypto import SigningKey
from freemark_keyserver.handlers.context import Context
from freemark_keyserver.handlers.hosts import store_host
from freemark_keyserver.handlers.register import register_host
from freemark_keyserver.sandbox.runner import SandboxLimits, default_workers, start_pool
from freemark_keyserver.store import Store, StoredCheckpoint, open_store
from freemark_lab import imagenet
from pg import PostgresServer, PostgresUnavailable, create_database
from ttp_fleet import (
    ARBITER,
    Host,
    SharedKeys,
    add_principals,
    build_hosts,
    fleet_principals,
    in_process_sandbox,
    shared_keys,
)

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
CHUNK = 1 << 20  # the client library's chunk size
RSS_GOAL_FACTOR, RSS_GOAL_SLACK_MB = 1.2, 200
UPLOAD_GOAL, REGISTER_GOAL = 0.7, 0.5
VERIFY_GOAL, FULL_VS_TTP_GOAL = 1.3, 0.5  # Verify over its in-process floor; full over TTP only
START_TIMEOUT_S = 120.0
RSS_SAMPLE_S = 0.01
WIDE_HIDDEN_LAYERS = 4  # square hidden layers of a "wide" model: they hold nearly all weights
REGISTER_SPLIT_HOSTS = 16
SHED_SLOTS, SHED_EXCESS = 4, 32
SETTLE_S = 0.2  # for calls already sent to reach the server
SHED_HOLD_S = 2.0  # how long the stalled uploads keep the slots: what a queued call would wait
LOAD_CALLS = ("get_registration", "list_registrations", "get_checkpoint", "get_inclusion_proof",
              "get_public_key")


@dataclass(frozen=True)
class Plan:
    """Everything `--quick` shrinks."""

    clients: tuple[int, ...]
    echo_calls: int  # per client
    checkpoint_calls: int  # per client
    register_full: int  # registrations per cell: at least this, and one per client
    register_ttp: int  # the same, with the sandbox replayed
    sizes_mb: tuple[int, ...]
    upload_repeats: int
    load_clients: int
    load_requests: int  # per client
    hosts: int


FULL = Plan(clients=(1, 8, 32), echo_calls=400, checkpoint_calls=150, register_full=4,
            register_ttp=64, sizes_mb=(10, 100, 500), upload_repeats=3, load_clients=32,
            load_requests=1000, hosts=64)
QUICK = Plan(clients=(1, 8), echo_calls=100, checkpoint_calls=40, register_full=2,
             register_ttp=16, sizes_mb=(10, 100), upload_repeats=1, load_clients=8,
             load_requests=50, hosts=16)


# --- measurement helpers ----------------------------------------------------------------------


@dataclass
class Stats:
    """Latencies of one run of concurrent clients."""

    clients: int
    latencies: list[float]
    wall_s: float
    errors: int

    @property
    def qps(self) -> float:
        return len(self.latencies) / self.wall_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else math.nan

    def row(self) -> dict[str, Any]:
        return {"clients": self.clients, "calls": len(self.latencies), "errors": self.errors,
                "qps": self.qps, "p50_ms": self.percentile_ms(50),
                "p99_ms": self.percentile_ms(99)}


def run_clients(clients: int, jobs: Sequence[Any], work: Callable[[int, Any], None]) -> Stats:
    """Run `work(client, job)` for every job, spread round-robin over `clients` threads that
    start together; time each call. A raised exception counts as an error."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        barrier.wait()
        for job in jobs[number::clients]:
            began = time.perf_counter()
            try:
                work(number, job)
            except Exception:  # noqa: BLE001 - counted, and the run goes on
                with lock:
                    errors[0] += 1
                continue
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return Stats(clients, latencies, time.perf_counter() - began, errors[0])


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


def high_water_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise ValueError(f"no VmHWM for process {pid}")


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


class RssSampler:
    """Samples a process's RSS, and its children's together, every 10 ms while in use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self.children_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            children = sum(rss_mb(child) for child in descendants(self.pid))
            self.children_peak_mb = max(self.children_peak_mb, children)
            time.sleep(RSS_SAMPLE_S)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def median_time(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# --- processes and databases --------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This process's environment without secrets (FREEMARK_*): servers get keys as files."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FREEMARK_")}


class ServerProc:
    """A server subprocess that prints ``listening on HOST:PORT``; its output goes to files."""

    def __init__(self, argv: list[str], logs: Path, name: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=child_env(),
                                            cwd=ROOT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "listening on" not in self.out.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start: {self.err.read_text()[-2000:]}")
            time.sleep(0.05)
        line = next(x for x in self.out.read_text().splitlines() if "listening on" in x)
        self.address = line.rsplit(" ", 1)[1]
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Deployment:
    """What every key server in this run shares: keys, hosts, and where databases go."""

    work: Path
    keys: SharedKeys
    pg_admin: str | None
    hosts: list[Host]
    replay_table: Path
    counter: int = 0

    def database(self, backend: str) -> str:
        self.counter += 1
        if backend == "sqlite":
            return str(self.work / f"db{self.counter}.sqlite3")
        assert self.pg_admin is not None
        return create_database(self.pg_admin, f"bench{self.counter}")

    def server(self, backend: str, *, replay: bool = False, extra: Sequence[str] = ()
               ) -> tuple[ServerProc, str, dict[str, str]]:
        """A fresh database with every host's owner and an arbiter, and a server on it."""
        db = self.database(backend)
        tokens = add_principals(db, fleet_principals(self.hosts))
        name = f"server{self.counter}"
        common = ["--data-dir", str(self.work / name), "--db", db,
                  "--master-key-file", str(self.keys.master_key_file),
                  "--signing-key-file", str(self.keys.signing_key_file)]
        if replay:
            argv = [sys.executable, str(ROOT / "bench" / "_servers.py"), "replay", *common,
                    "--replay", str(self.replay_table)]
        else:
            # The benchmark measures the server, not its per-principal limits.
            argv = [sys.executable, "-m", "freemark_keyserver.cli", "serve", *common,
                    "--listen", "127.0.0.1:0", "--verify-rate-principal", "off",
                    "--verify-rate-registration", "off", "--max-calls-per-principal", "64", *extra]
        return ServerProc(argv, self.work / "logs", name), db, tokens


# --- requests -------------------------------------------------------------------------------


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def upload_header(path: Path, sha256: bytes | None = None) -> pb.UploadHeader:
    """The header for uploading the .pt2 at `path`; `sha256` defaults to its real digest."""
    digest = sha256 if sha256 is not None else bytes.fromhex(file_sha256(path))
    return pb.UploadHeader(total_size=path.stat().st_size, sha256=digest,
                           format=pb.MODEL_FORMAT_PT2)


def register_stream(bundle: KeyBundle, path: Path, header: pb.UploadHeader
                    ) -> Iterator[pb.RegisterRequest]:
    yield pb.RegisterRequest(header=pb.RegisterHeader(bundle=to_proto(bundle), upload=header))
    for chunk in read_chunks(path):
        yield pb.RegisterRequest(chunk=chunk)


def verify_stream(registration_id: str, path: Path, header: pb.UploadHeader
                  ) -> Iterator[pb.VerifyRequest]:
    yield pb.VerifyRequest(header=pb.VerifyHeader(registration_id=registration_id, upload=header))
    for chunk in read_chunks(path):
        yield pb.VerifyRequest(chunk=chunk)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def stub(address: str) -> tuple[grpc.Channel, keyservice_pb2_grpc.KeyServiceStub]:
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    return channel, keyservice_pb2_grpc.KeyServiceStub(channel)


def upload_only(address: str, token: str, bundle: KeyBundle, path: Path) -> float:
    """Seconds to stream `path` through Register's upload path; a zero checksum in the header
    makes the server refuse it (DATA_LOSS) right after spooling and hashing the last byte."""
    channel, keyservice = stub(address)
    try:
        began = time.perf_counter()
        try:
            keyservice.Register(register_stream(bundle, path, upload_header(path, bytes(32))),
                                metadata=bearer(token), timeout=600)
        except grpc.RpcError as refused:
            if refused.code() != grpc.StatusCode.DATA_LOSS:
                raise
        else:
            raise RuntimeError("the server accepted an upload with a wrong checksum")
        return time.perf_counter() - began
    finally:
        channel.close()


# --- models ---------------------------------------------------------------------------------


class WideMLP(nn.Module):
    """An MLP for 8x8 digits whose weights are almost all in square hidden layers: a model of a
    chosen size. The key layer is `act`, right after the first layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc_in = nn.Linear(64, width)
        self.act = nn.ReLU()
        self.hidden = nn.Sequential(*[
            layer for _ in range(WIDE_HIDDEN_LAYERS) for layer in (nn.Linear(width, width),
                                                                    nn.ReLU())])
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.act(self.fc_in(self.flatten(x)))))


@dataclass(frozen=True)
class BigModel:
    """A model file of about `size_mb` MB and its owner's key."""

    size_mb: int
    path: Path
    bytes: int
    bundle: KeyBundle


def build_big_model(folder: Path, size_mb: int, owner: str, template: KeyBundle) -> BigModel:
    """A `size_mb` MB .pt2 and a key for it on the same triggers as the fleet's hosts."""
    width = int(math.sqrt(size_mb * MB / 4 / WIDE_HIDDEN_LAYERS))
    torch.manual_seed(size_mb)
    with torch.no_grad():
        model = WideMLP(width)
    path = folder / f"wide{size_mb}mb.pt2"
    save_program(model, (torch.zeros(2, 1, 8, 8),), path)
    bundle = derive_key(model, layer="act", triggers=template.triggers, owner=owner)
    return BigModel(size_mb, path, path.stat().st_size, bundle)


def build_efficientnet(folder: Path, owner: str) -> BigModel:
    """The lab's pretrained EfficientNet-Lite0 as a .pt2, and `owner`'s key for it: 16 photos
    at 224 x 224, layer `_bn1` (1,280 units, mean-pooled over space), the default 1,024 probes
    (freemark_lab.imagenet). A real ImageNet CNN: what Verify costs on a model owners register."""
    model = imagenet.load_efficientnet_lite0()
    path = folder / "efficientnet-lite0.pt2"
    save_program(model, (torch.zeros(2, 3, imagenet.IMAGE_SIZE, imagenet.IMAGE_SIZE),), path)
    bundle = derive_key(model, layer=imagenet.KEY_LAYER, triggers=imagenet.photo_triggers(),
                        owner=owner)
    size = path.stat().st_size
    return BigModel(round(size / MB), path, size, bundle)


# --- sections -------------------------------------------------------------------------------


def floor_echo(floor: ServerProc, clients: int, calls: int) -> Stats:
    """`calls` echoes of a 32-byte payload per client, `clients` at once, a channel each."""
    channels = [grpc.insecure_channel(floor.address) for _ in range(clients)]
    echoes = [c.unary_unary(f"/{FLOOR_SERVICE}/Echo") for c in channels]
    try:
        return run_clients(clients, range(clients * calls),
                           lambda n, _: echoes[n](b"x" * 32, timeout=30))
    finally:
        for channel in channels:
            channel.close()


def floor_sink(floor: ServerProc, path: Path, repeats: int) -> float:
    """Seconds to stream `path` into the bare sink (median)."""
    channel = grpc.insecure_channel(floor.address)
    sink = channel.stream_unary(f"/{FLOOR_SERVICE}/Sink")
    try:
        return median_time(repeats, lambda: sink(read_chunks(path), timeout=600))
    finally:
        channel.close()


def registers(deploy: Deployment, backend: str, clients: int, count: int, *, replay: bool,
              checkpoint_calls: int = 0) -> tuple[Stats, Stats | None]:
    """`count` registrations of distinct hosts by `clients` concurrent clients on a fresh
    server; then, if asked, `checkpoint_calls` GetCheckpoint calls per client on the same one."""
    server, _, tokens = deploy.server(backend, replay=replay)
    stubs = [stub(server.address) for _ in range(clients)]
    headers = {i: upload_header(deploy.hosts[i].model) for i in range(count)}
    try:
        def register(client: int, index: int) -> None:
            host = deploy.hosts[index]
            stubs[client][1].Register(register_stream(host.bundle, host.model, headers[index]),
                                      metadata=bearer(tokens[host.owner]), timeout=900)

        def checkpoint(client: int, _: int) -> None:
            stubs[client][1].GetCheckpoint(pb.GetCheckpointRequest(),
                                           metadata=bearer(tokens[ARBITER]), timeout=30)

        registered = run_clients(clients, range(count), register)
        checked = (run_clients(clients, range(clients * checkpoint_calls), checkpoint)
                   if checkpoint_calls else None)
        return registered, checked
    finally:
        for channel, _ in stubs:
            channel.close()
        server.stop()


def register_big(deploy: Deployment, backend: str, model: BigModel, owner_index: int
                 ) -> dict[str, Any]:
    """Upload-only, then a full Register of `model`, on a fresh server, sampling its RSS."""
    host = deploy.hosts[owner_index]
    server, db, tokens = deploy.server(backend)
    try:
        idle = rss_mb(server.pid)
        with RssSampler(server.pid) as during_upload:
            upload_s = upload_only(server.address, tokens[host.owner], model.bundle, model.path)
        channel, keyservice = stub(server.address)
        header = upload_header(model.path)
        with RssSampler(server.pid) as during_register:
            began = time.perf_counter()
            receipt = keyservice.Register(register_stream(model.bundle, model.path, header),
                                          metadata=bearer(tokens[host.owner]), timeout=900)
            register_s = time.perf_counter() - began
        channel.close()
        high_water = high_water_mb(server.pid)
        return {"backend": backend, "model_mb": model.bytes / MB, "idle_rss_mb": idle,
                "upload_s": upload_s, "upload_peak_rss_mb": during_upload.peak_mb,
                "register_s": register_s, "register_peak_rss_mb": during_register.peak_mb,
                "sandbox_peak_rss_mb": during_register.children_peak_mb,
                "high_water_mb": high_water,
                "goal_mb": model.bytes / MB * RSS_GOAL_FACTOR + RSS_GOAL_SLACK_MB,
                "registration_id": receipt.registration_id, "db": db,
                "server": server, "token": tokens[host.owner], "arbiter": tokens[ARBITER]}
    except BaseException:
        server.stop()
        raise


def pool_idle_memory() -> dict[str, float]:
    """The warm sandbox's fork server at rest: RSS and PSS (its pages shared with nothing
    else count whole; children share them copy-on-write) in MB, and its start-up time."""
    started = time.perf_counter()
    pool = start_pool(SandboxLimits(), workers=1, queue=0)
    start_s = time.perf_counter() - started
    try:
        assert pool.pid is not None
        rollup = Path(f"/proc/{pool.pid}/smaps_rollup").read_text().splitlines()
        fields = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in rollup[1:]}
        return {"rss_mb": rss_mb(pool.pid), "pss_mb": fields.get("Pss", float("nan")),
                "start_s": start_s, "workers_default": default_workers(SandboxLimits()),
                "isolation": pool.isolation.summary()}
    finally:
        pool.close()


def upload_costs_ms() -> dict[str, float]:
    """Per MiB, measured alone: the client's protobuf message, and the server's parse, SHA-256
    and spool-file write: the work a streamed upload does that the bare sink does not."""
    data = os.urandom(CHUNK)
    wire = pb.RegisterRequest(chunk=data).SerializeToString()
    digest = hashlib.sha256()
    repeats = 200
    with tempfile.TemporaryFile() as spool:
        costs = {
            "client_serialize_ms": median_time(
                repeats, lambda: pb.RegisterRequest(chunk=data).SerializeToString()),
            "server_parse_ms": median_time(
                repeats, lambda: pb.RegisterRequest.FromString(wire).chunk),
            "server_sha256_ms": median_time(repeats, lambda: digest.update(data)),
            "server_write_ms": median_time(repeats, lambda: spool.write(data)),
        }
    return {name: seconds * 1000 for name, seconds in costs.items()}


def log_and_sign_s(db: str, signer: SigningKey, repeats: int) -> float:
    """What Register and Verify do once judged, alone: append a statement-sized entry, sign it,
    sign the new checkpoint and compute the inclusion proof (on a log of a few hundred entries)."""
    store: Store = open_store(db)
    body = {"kind": "bench", "p_value": 1e-30, "registration_id": "reg_" + "0" * 24,
            "requested_by": "judge", "suspect_sha256": "0" * 64}
    try:
        for _ in range(200):
            store.append("bench", lambda i, t: canonical_json({**body, "log_index": i}))

        def once() -> None:
            entry = store.append("bench", lambda i, t: canonical_json({**body, "log_index": i}))
            signer.sign(entry.entry)
            leaves = store.leaf_hashes(entry.index + 1)
            checkpoint = merkle.TreeHead(origin="bench", tree_size=len(leaves),
                                           root_hash=merkle.root(leaves), timestamp=0)
            signed = merkle.sign_checkpoint(signer, checkpoint)
            store.add_checkpoint(StoredCheckpoint(len(leaves), signed.note))
            merkle.inclusion_proof(leaves, entry.index)

        return median_time(repeats, once)
    finally:
        store.close()


def register_split(deploy: Deployment, backend: str, count: int) -> dict[str, Any]:
    """Register's own work per call, in this process on one thread: the handler end to end
    (no gRPC, the sandbox replayed), and its parts alone: the scheme's checks (the calibrated
    verdict on the host and the uniqueness null panel), sealing and storing the host, and
    log+sign. What is left is bundle sealing, lookups and receipt building."""
    db = deploy.database(backend)
    add_principals(db, fleet_principals(deploy.hosts))
    config = ServerConfig(data_dir=deploy.work / f"split-{backend}", db=db,
                          master_key_file=deploy.keys.master_key_file,
                          signing_key_file=deploy.keys.signing_key_file)
    replay = ReplaySandbox(deploy.replay_table)
    store = open_store(db)
    try:
        ctx = Context(config=config, store=store, keyring=load_keyring(config),
                      signer=load_signing_key(config), sandbox=replay)
        hosts = deploy.hosts[:count]
        results = {host.owner: replay(host.model, layer=host.bundle.layer,
                                      pooling=host.bundle.pooling, triggers=host.bundle.triggers)
                   for host in hosts}

        def checks(host: Host) -> None:
            activations = results[host.owner].activations
            judge_activations(activations, host.bundle)
            check_uniqueness(host.bundle.key.astype(np.float64), host.bundle.bits,
                             suspect_vector(activations, centred=host.bundle.centred))

        def seal_and_store(host: Host) -> None:
            store_host(store, ctx.keyring, host.model, owner=host.owner,
                       registration_id=f"bench_{host.owner}")

        def register(host: Host) -> None:
            principal = store.principal_by_name(host.owner)
            assert principal is not None
            register_host(ctx, principal, host.bundle, host.model)

        split = {name: statistics.median(median_time(1, functools.partial(work, h))
                                         for h in hosts)
                 for name, work in (("checks_ms", checks), ("store_host_ms", seal_and_store))}
        split["log_sign_ms"] = log_and_sign_s(db, ctx.signer, count)
        handler = statistics.median(median_time(1, functools.partial(register, h))
                                    for h in hosts)
    finally:
        store.close()
    split = {name: seconds * 1000 for name, seconds in split.items()}
    return {"backend": backend, "handler_ms": handler * 1000, **split,
            "sum_ms": sum(split.values())}


def verify_split(name: str, path: Path, bundle: KeyBundle, address: str,
                 tokens: tuple[str, str], registration_id: str, parts: dict[str, float],
                 repeats: int) -> dict[str, Any]:
    """End-to-end Verify of `path` against its own registration, and its parts measured alone.

    `tokens`: the owner's (the upload alone goes through Register) and an arbiter's.
    """
    owner, arbiter = tokens
    upload = median_time(repeats, lambda: upload_only(address, owner, bundle, path))
    load = median_time(repeats, lambda: vet_program(load_program(path)))
    program = load_program(path)
    captured: list[np.ndarray] = []
    # Verify reads the alignment probes too only when the registration's panel lets the
    # aligned test run (`aligns`); these are registered without one, so it reads the
    # triggers alone. Probes, where read, are built by the sandbox child (0.6 GB of them for
    # a 224 x 224 key): a part of their own.
    count = probe_count(bundle, probes=aligns(bundle, ()))
    probes_s = median_time(repeats, lambda: with_probes(bundle.triggers, count))
    probed = with_probes(bundle.triggers, count)
    forward = median_time(repeats, lambda: captured.append(
        capture(program, bundle.layer, probed, pooling=bundle.pooling)[0]))
    triggers, probes = split_activations(captured[-1], bundle, count)
    extract = median_time(repeats, lambda: judge_activations(triggers, bundle,
                                                             probe_activations=probes))
    channel, keyservice = stub(address)
    header = upload_header(path)
    try:
        total = median_time(repeats, lambda: keyservice.Verify(
            verify_stream(registration_id, path, header), metadata=bearer(arbiter), timeout=900))
    finally:
        channel.close()
    # No fingerprint: Verify does not hash the suspect's weights (`SKIP_FINGERPRINT`).
    split = {"upload_s": upload, "load_s": load, "probes_s": probes_s, "forward_s": forward,
             "extract_s": extract, "log_sign_s": parts["log_sign_s"]}
    summed = sum(split.values())
    floor = upload + load + forward + extract  # what any TTP must do for this Verify
    return {"model": name, "bytes": path.stat().st_size, **split, "sum_s": summed,
            "verify_s": total, "unexplained_s": total - summed, "floor_s": floor,
            "ratio_to_floor": total / floor}


def verify_split_on_a_fresh_server(deploy: Deployment, servers: list[Any], name: str,
                                   path: Path, bundle: KeyBundle, parts: dict[str, float],
                                   repeats: int) -> dict[str, Any]:
    """Register the model at `path` with its owner's `bundle` on a new SQLite server (kept in
    `servers`), then split its Verify's time (the row is called `name`)."""
    server, _, tokens = deploy.server("sqlite")
    servers.append(server)
    try:
        channel, keyservice = stub(server.address)
        receipt = keyservice.Register(register_stream(bundle, path, upload_header(path)),
                                      metadata=bearer(tokens[bundle.owner]), timeout=900)
        channel.close()
        return verify_split(name, path, bundle, server.address,
                            (tokens[bundle.owner], tokens[ARBITER]), receipt.registration_id,
                            parts, repeats)
    finally:
        server.stop()


def efficientnet_verify_split(deploy: Deployment, servers: list[Any],
                              parts: dict[str, float]) -> dict[str, Any]:
    """EfficientNet-Lite0's Verify split, owned by the last host's owner. Once: Register reads
    1,040 images at 224 x 224 (16 triggers and the 1,024 probes of the host's profile), about
    a minute on one thread; Verify, without a panel, the 16 triggers."""
    model = build_efficientnet(deploy.work / "models", deploy.hosts[-1].owner)
    return verify_split_on_a_fresh_server(deploy, servers, "EfficientNet-Lite0", model.path,
                                          model.bundle, parts, 1)


def load_mix(deploy: Deployment, plan: Plan) -> dict[str, Any]:
    """`plan.load_clients` x `plan.load_requests` cheap calls through two PostgreSQL replicas."""
    db = deploy.database("postgres")
    tokens = add_principals(db, fleet_principals(deploy.hosts))
    replicas = []
    try:
        for i in range(2):
            argv = [sys.executable, str(ROOT / "bench" / "_servers.py"), "replay",
                    "--data-dir", str(deploy.work / f"replica{i}"), "--db", db,
                    "--master-key-file", str(deploy.keys.master_key_file),
                    "--signing-key-file", str(deploy.keys.signing_key_file),
                    "--replay", str(deploy.replay_table)]
            replicas.append(ServerProc(argv, deploy.work / "logs", f"replica{i}"))
        registered = []
        channel, keyservice = stub(replicas[0].address)
        for host in deploy.hosts[:8]:
            registered.append(keyservice.Register(
                register_stream(host.bundle, host.model, upload_header(host.model)),
                metadata=bearer(tokens[host.owner]), timeout=120))
        channel.close()
        size = len(registered)
        stubs = [stub(replicas[n % 2].address) for n in range(plan.load_clients)]
        per_call: dict[str, list[float]] = {call: [] for call in LOAD_CALLS}
        lock = threading.Lock()

        def call(client: int, n: int) -> None:
            index = client % size
            meta = bearer(tokens[deploy.hosts[index].owner])
            name = LOAD_CALLS[(client + n) % len(LOAD_CALLS)]
            keyservice = stubs[client][1]
            began = time.perf_counter()
            if name == "get_registration":
                keyservice.GetRegistration(pb.GetRegistrationRequest(
                    registration_id=registered[index].registration_id), metadata=meta, timeout=30)
            elif name == "list_registrations":
                keyservice.ListRegistrations(pb.ListRegistrationsRequest(page_size=20),
                                             metadata=meta, timeout=30)
            elif name == "get_checkpoint":
                keyservice.GetCheckpoint(pb.GetCheckpointRequest(), metadata=meta, timeout=30)
            elif name == "get_inclusion_proof":
                keyservice.GetInclusionProof(pb.GetInclusionProofRequest(log_index=n % size),
                                             metadata=meta, timeout=30)
            else:
                keyservice.GetPublicKey(pb.GetPublicKeyRequest(), metadata=meta, timeout=30)
            with lock:
                per_call[name].append(time.perf_counter() - began)

        jobs = [n for n in range(plan.load_requests) for _ in range(plan.load_clients)]
        stats = run_clients(plan.load_clients, jobs, call)
        for channel, _ in stubs:
            channel.close()
        return {"stats": stats, "per_call": per_call}
    finally:
        for replica in replicas:
            replica.stop()


def shedding(deploy: Deployment) -> dict[str, Any]:
    """Hold every slot of a --max-concurrent-rpcs 4 server with stalled uploads; time excess calls."""
    server, _, tokens = deploy.server("sqlite", extra=["--max-concurrent-rpcs", str(SHED_SLOTS)])
    gate = threading.Event()
    host = deploy.hosts[0]
    started = [threading.Event() for _ in range(SHED_SLOTS)]

    def stalled(number: int) -> Iterator[pb.RegisterRequest]:
        upload = pb.UploadHeader(total_size=2, sha256=bytes(32), format=pb.MODEL_FORMAT_PT2)
        yield pb.RegisterRequest(header=pb.RegisterHeader(bundle=to_proto(host.bundle),
                                                          upload=upload))
        yield pb.RegisterRequest(chunk=b"x")
        started[number].set()  # gRPC asks for more only once the call is under way
        gate.wait()
        yield pb.RegisterRequest(chunk=b"y")

    channel, keyservice = stub(server.address)
    try:
        held_since = time.perf_counter()
        slow = [keyservice.Register.future(stalled(n), metadata=bearer(tokens[host.owner]),
                                           timeout=120) for n in range(SHED_SLOTS)]
        # A probe sent before every stalled upload is in could take a slot from one of them.
        for event in started:
            event.wait(START_TIMEOUT_S)
        time.sleep(SETTLE_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:  # until the stalled uploads hold every slot
            ended = [call.exception() for call in slow if call.done()]
            if ended:
                raise RuntimeError(f"a stalled upload ended early: {ended[0]}")
            try:
                keyservice.GetPublicKey(pb.GetPublicKeyRequest(), timeout=5)
            except grpc.RpcError as refused:
                if refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
            time.sleep(0.02)
        else:
            raise RuntimeError("the stalled uploads never filled the slots")
        probes = [stub(server.address) for _ in range(SHED_EXCESS)]
        codes: list[grpc.StatusCode] = []

        def excess(client: int, _: int) -> None:
            try:
                probes[client][1].GetPublicKey(pb.GetPublicKeyRequest(),
                                               metadata=bearer(tokens[ARBITER]), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as refused:
                codes.append(refused.code())

        stats = run_clients(SHED_EXCESS, range(SHED_EXCESS), excess)
        time.sleep(max(0.0, SHED_HOLD_S - (time.perf_counter() - held_since)))
        still_held = not any(call.done() for call in slow)
        held_s = time.perf_counter() - held_since
        gate.set()
        for call in slow:
            with contextlib.suppress(grpc.RpcError):
                call.result(timeout=60)
        for probe, _ in probes:
            probe.close()
        exhausted = sum(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in codes)
        return {"slots": SHED_SLOTS, "excess_calls": SHED_EXCESS, "refused": exhausted,
                "p50_ms": stats.percentile_ms(50), "p99_ms": stats.percentile_ms(99),
                "max_ms": max(stats.latencies) * 1000, "slow_calls_held_s": held_s,
                "slow_calls_still_held": still_held}
    finally:
        gate.set()
        channel.close()
        server.stop()


# --- the run --------------------------------------------------------------------------------


def record_replay(hosts: list[Host], table: Path) -> None:
    """The sandbox's answer for every host, computed once, for the replay servers."""
    results = {}
    for host in hosts:
        bundle = host.bundle
        # Register reads the triggers and the alignment probes in one run: record both.
        results[file_sha256(host.model)] = in_process_sandbox(
            host.model, layer=bundle.layer, pooling=bundle.pooling,
            triggers=inputs(bundle, probes=True))
    save_replay_table(table, results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--workdir", type=Path, help="scratch space (default: a temp dir)")
    parser.add_argument("--sandbox", action="store_true",
                        help="only the warm sandbox's figures (about 4 minutes, SQLite)")
    args = parser.parse_args(argv)
    if args.sandbox:
        torch.set_num_threads(1)
        work = Path(tempfile.mkdtemp(prefix="freemark-bench-", dir=args.workdir))
        servers: list[ServerProc] = []
        try:
            results = run_sandbox(SANDBOX, work, servers)
            results["plan"] = SANDBOX.__dict__
            if args.json:
                write_json(args.json, results)
                print(f"wrote {args.json}")
        finally:
            for server in servers:
                server.stop()
            shutil.rmtree(work, ignore_errors=True)
        return 0
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="freemark-bench-", dir=args.workdir))
    postgres = PostgresServer()
    servers: list[ServerProc] = []
    try:
        try:
            pg_admin: str | None = postgres.start()
        except PostgresUnavailable as e:
            print(f"no PostgreSQL ({e}); PostgreSQL rows are skipped", flush=True)
            pg_admin = None
        backends = ["sqlite"] + (["postgres"] if pg_admin else [])
        results = run(plan, work, pg_admin, backends, servers)
        results["plan"] = plan.__dict__
        if args.json:
            write_json(args.json, results)
            print(f"wrote {args.json}")
    finally:
        for server in servers:
            server.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_verify(rows: list[dict[str, Any]]) -> None:
    print_table(f"(e) Verify latency (s): parts measured alone vs end to end; floor = upload + "
                f"load + forward + extract in process (goal <= {VERIFY_GOAL}x)",
                ["model", "upload", "load", "probes", "forward", "extract", "log+sign", "sum",
                 "Verify", "gap", "floor", "x floor"],
                [[r["model"], r["upload_s"], r["load_s"], r["probes_s"], r["forward_s"],
                  r["extract_s"], r["log_sign_s"], r["sum_s"], r["verify_s"],
                  r["unexplained_s"], r["floor_s"], r["ratio_to_floor"]] for r in rows])


def print_full_vs_ttp(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Register (full) QPS over Register (TTP only) QPS, per backend and concurrency."""
    by = {(r["backend"], r["clients"], r["call"]): r for r in rows}
    ratios = [{"backend": b, "clients": c, "full_qps": full["qps"],
               "ttp_qps": by[(b, c, "Register (TTP only)")]["qps"],
               "ratio": full["qps"] / by[(b, c, "Register (TTP only)")]["qps"]}
              for (b, c, call), full in by.items() if call == "Register (full)"]
    print_table(f"(b) Register (full) vs Register (TTP only) QPS (goal >= {FULL_VS_TTP_GOAL}x)",
                ["db", "clients", "full QPS", "TTP-only QPS", "ratio"],
                [list(r.values()) for r in ratios])
    return ratios


def register_model_work_s(hosts: list[Host]) -> float:
    """The model's own work in one Register, in this process, mean over `hosts` registered in
    order: load + vetting, the host on its triggers and probes, and the host on every earlier
    host's triggers (the prior-claim sets; none of them has a panel, so no probes). What any
    TTP that runs the upload at all must spend, sandbox or not."""
    def one(index: int) -> float:
        host = hosts[index]
        program = load_program(host.model)
        began = time.perf_counter()
        vet_program(load_program(host.model))
        capture(program, host.bundle.layer, inputs(host.bundle, probes=True),
                pooling=host.bundle.pooling)
        for earlier in hosts[:index]:
            capture(program, earlier.bundle.layer, earlier.bundle.triggers,
                    pooling=earlier.bundle.pooling)
        return time.perf_counter() - began
    return statistics.mean(one(i) for i in range(len(hosts)))


def print_register_floor(rows: list[dict[str, Any]], model_work_s: float) -> dict[str, Any]:
    """Register at one client against the best any sandbox could do: TTP only plus the
    model's own work, one after the other."""
    by = {r["call"]: r for r in rows if r["clients"] == 1}
    ttp_s = 1 / by["Register (TTP only)"]["qps"]
    full_qps = by["Register (full)"]["qps"]
    floor_qps = 1 / (ttp_s + model_work_s)
    row = {"ttp_only_s": ttp_s, "model_work_s": model_work_s, "floor_qps": floor_qps,
           "full_qps": full_qps, "full_over_floor": full_qps / floor_qps}
    print_table("(b') Register at 1 client: TTP only + the model's own work in process",
                ["TTP only s", "model work s", "floor QPS", "full QPS", "full / floor"],
                [list(row.values())])
    return row


def run_sandbox(plan: Plan, work: Path, servers: list[ServerProc]) -> dict[str, Any]:
    """`--sandbox`: the warm pool's figures alone, in a few minutes on SQLite: Register (full)
    vs (TTP only), Verify against its floor for the digits CNN, a 100 MB model and
    EfficientNet-Lite0, and the pool's idle memory."""
    began = time.perf_counter()
    (work / "models").mkdir()
    hosts = build_hosts(work / "models", plan.hosts)
    replay_table = work / "replay.npz"
    record_replay(hosts, replay_table)
    deploy = Deployment(work, shared_keys(work / "keys"), None, hosts, replay_table)
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    idle = pool_idle_memory()
    print_table("sandbox pool at rest (fork server, torch imported, no child)",
                ["RSS MB", "PSS MB", "start s", "default workers here", "isolation"],
                [list(idle.values())])
    results["pool_idle"] = idle
    rows = []
    for clients in plan.clients:
        for label, replay, count in (("Register (full)", False, plan.register_full),
                                     ("Register (TTP only)", True, plan.register_ttp)):
            stats, _ = registers(deploy, "sqlite", clients, max(clients, count), replay=replay)
            rows.append({"backend": "sqlite", "call": label, **stats.row()})
        print(f"  {clients} clients done ({time.perf_counter() - began:.0f} s)", flush=True)
    results["register_full_vs_ttp"] = print_full_vs_ttp(rows)
    results["register_floor"] = print_register_floor(
        rows, register_model_work_s(hosts[:plan.register_full]))
    parts = {"log_sign_s": log_and_sign_s(str(work / "log-sign.sqlite3"), SigningKey.generate(),
                                          20)}
    split_rows = [verify_split_on_a_fresh_server(deploy, servers, "digits CNN", hosts[0].model,
                                                 hosts[0].bundle, parts, 5)]
    for i, size in enumerate(plan.sizes_mb):
        model = build_big_model(work / "models", size, hosts[i + 1].owner, hosts[0].bundle)
        split_rows.append(verify_split_on_a_fresh_server(deploy, servers, f"wide {size} MB",
                                                         model.path, model.bundle, parts, 2))
    split_rows.append(efficientnet_verify_split(deploy, servers, parts))
    print(f"  EfficientNet-Lite0 done ({time.perf_counter() - began:.0f} s)", flush=True)
    print_verify(split_rows)
    results["verify_split"] = split_rows
    results["elapsed_s"] = time.perf_counter() - began
    results["load_average_at_end"] = os.getloadavg()
    print(f"done in {results['elapsed_s']:.0f} s", flush=True)
    return results


SANDBOX = Plan(clients=(1, 2), echo_calls=0, checkpoint_calls=0, register_full=8,
               register_ttp=16, sizes_mb=(100,), upload_repeats=1, load_clients=0,
               load_requests=0, hosts=16)


def run(plan: Plan, work: Path, pg_admin: str | None, backends: list[str],
        servers: list[ServerProc]) -> dict[str, Any]:
    began = time.perf_counter()
    print(f"building {plan.hosts} hosts and models of {plan.sizes_mb} MB ...", flush=True)
    (work / "models").mkdir()
    hosts = build_hosts(work / "models", plan.hosts)
    big = [build_big_model(work / "models", size, hosts[i].owner, hosts[0].bundle)
           for i, size in enumerate(plan.sizes_mb)]
    replay_table = work / "replay.npz"
    record_replay(hosts, replay_table)
    deploy = Deployment(work, shared_keys(work / "keys"), pg_admin, hosts, replay_table)
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}

    # (a) the floor
    floor = ServerProc([sys.executable, str(ROOT / "bench" / "_servers.py"), "floor"],
                       work / "logs", "floor")
    servers.append(floor)
    echo = {clients: floor_echo(floor, clients, plan.echo_calls) for clients in plan.clients}
    sink_s = {m.size_mb: floor_sink(floor, m.path, plan.upload_repeats) for m in big}
    floor.stop()
    print_table("(a) floor: bare gRPC unary echo (32-byte payload)",
                ["clients", "calls", "QPS", "p50 ms", "p99 ms"],
                [[s.clients, len(s.latencies), s.qps, s.percentile_ms(50), s.percentile_ms(99)]
                 for s in echo.values()])
    results["echo"] = [s.row() for s in echo.values()]

    # (b) Register, and the cheapest store-reading call, against the echo
    rows, register_rows = [], []
    for backend in backends:
        for clients in plan.clients:
            full, _ = registers(deploy, backend, clients, max(clients, plan.register_full),
                                replay=False)
            ttp, cheap = registers(deploy, backend, clients, max(clients, plan.register_ttp),
                                   replay=True, checkpoint_calls=plan.checkpoint_calls)
            assert cheap is not None
            floor_qps = echo[clients].qps
            for label, stats in (("Register (full)", full), ("Register (TTP only)", ttp),
                                 ("GetCheckpoint", cheap)):
                rows.append([backend, label, clients, len(stats.latencies), stats.errors,
                             stats.qps, stats.percentile_ms(50), stats.percentile_ms(99),
                             stats.qps / floor_qps])
                register_rows.append({"backend": backend, "call": label, **stats.row(),
                                      "ratio_to_echo": stats.qps / floor_qps})
            print(f"  {backend} x {clients} clients done ({time.perf_counter() - began:.0f} s)",
                  flush=True)
    print_table(f"(b) Register and GetCheckpoint vs the echo floor (goal {REGISTER_GOAL})",
                ["db", "call", "clients", "calls", "errors", "QPS", "p50 ms", "p99 ms",
                 "x echo"], rows)
    results["register"] = register_rows
    results["register_full_vs_ttp"] = print_full_vs_ttp(register_rows)
    split = [register_split(deploy, backend, REGISTER_SPLIT_HOSTS) for backend in backends]
    print_table("(b) Register's own work (ms, median, in-process, sandbox replayed): parts alone",
                ["db", "handler", "checks", "seal+store host", "log+sign", "sum"],
                [[r["backend"], r["handler_ms"], r["checks_ms"], r["store_host_ms"],
                  r["log_sign_ms"], r["sum_ms"]] for r in split])
    results["register_split"] = split

    # (c) uploads, (d) memory, (e) Verify split: on a fresh SQLite server per model
    parts = {"log_sign_s": log_and_sign_s(str(work / "log-sign.sqlite3"), SigningKey.generate(),
                                          20)}
    upload_rows, rss_rows, split_rows = [], [], []
    for i, model in enumerate(big):
        largest = model is big[-1]
        for backend in (backends if largest else ["sqlite"]):
            done = register_big(deploy, backend, model, i)
            server = done.pop("server")
            servers.append(server)
            try:
                if backend == "sqlite":
                    upload_s = median_time(plan.upload_repeats, functools.partial(
                        upload_only, server.address, done["token"], model.bundle, model.path))
                    upload_rows.append({"model_mb": model.bytes / MB,
                                        "sink_MBps": model.bytes / MB / sink_s[model.size_mb],
                                        "server_MBps": model.bytes / MB / upload_s})
                    split_rows.append(verify_split(
                        f"wide {model.size_mb} MB", model.path, model.bundle, server.address,
                        (done["token"], done["arbiter"]), done["registration_id"], parts,
                        1 if largest else 2))
                rss_rows.append({k: v for k, v in done.items()
                                 if k not in ("token", "arbiter", "db", "registration_id")})
            finally:
                server.stop()
        print(f"  {model.size_mb} MB model done ({time.perf_counter() - began:.0f} s)",
              flush=True)
    for row in upload_rows:
        row["ratio"] = row["server_MBps"] / row["sink_MBps"]
    print_table(f"(c) streamed upload (1 MiB chunks) vs the bare sink (goal {UPLOAD_GOAL})",
                ["model MB", "sink MB/s", "server MB/s", "ratio"],
                [list(r.values()) for r in upload_rows])
    costs = upload_costs_ms()
    print_table("(c) what an upload does beyond the sink, ms per MiB measured alone",
                ["client protobuf", "server parse", "server SHA-256", "server write"],
                [list(costs.values())])
    print_table("(d) peak server RSS (MB) per model (goal: size x 1.2 + 200)",
                ["db", "model MB", "idle", "upload peak", "register peak", "high water",
                 "goal", "sandbox peak", "register s"],
                [[r["backend"], r["model_mb"], r["idle_rss_mb"], r["upload_peak_rss_mb"],
                  r["register_peak_rss_mb"], r["high_water_mb"], r["goal_mb"],
                  r["sandbox_peak_rss_mb"], r["register_s"]] for r in rss_rows])

    # (e) also for a small host, registered on a replay-free server
    split_rows.insert(0, verify_split_on_a_fresh_server(deploy, servers, "digits CNN",
                                                        hosts[0].model, hosts[0].bundle, parts, 3))
    split_rows.append(efficientnet_verify_split(deploy, servers, parts))
    print_verify(split_rows)
    results.update(upload=upload_rows, upload_costs_ms_per_mib=costs, rss=rss_rows,
                   verify_split=split_rows)

    # (f) load and shedding
    if pg_admin:
        mix = load_mix(deploy, plan)
        load: Stats = mix["stats"]
        print_table(f"(f) {plan.load_clients} clients x {plan.load_requests} mixed cheap calls, "
                    "two PostgreSQL replicas",
                    ["call", "calls", "errors", "p50 ms", "p99 ms"],
                    [[name, len(lat), "-", float(np.percentile(lat, 50) * 1000),
                      float(np.percentile(lat, 99) * 1000)]
                     for name, lat in mix["per_call"].items()]
                    + [["all", len(load.latencies), load.errors, load.percentile_ms(50),
                        load.percentile_ms(99)]])
        print(f"  {load.qps:.0f} calls/s over {load.wall_s:.1f} s\n", flush=True)
        results["load"] = {**load.row(), "wall_s": load.wall_s, "per_call": {
            name: {"calls": len(lat), "p50_ms": float(np.percentile(lat, 50) * 1000),
                   "p99_ms": float(np.percentile(lat, 99) * 1000)}
            for name, lat in mix["per_call"].items()}}
    shed = shedding(deploy)
    print_table("(f) load shedding: excess calls while stalled uploads hold every slot",
                ["slots", "excess", "RESOURCE_EXHAUSTED", "p50 ms", "p99 ms", "max ms",
                 "slots held s"],
                [[shed["slots"], shed["excess_calls"], shed["refused"], shed["p50_ms"],
                  shed["p99_ms"], shed["max_ms"], shed["slow_calls_held_s"]]])
    results["shedding"] = shed
    results["elapsed_s"] = time.perf_counter() - began
    results["load_average_at_end"] = os.getloadavg()
    print(f"done in {results['elapsed_s']:.0f} s; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (two cores, shared)", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
