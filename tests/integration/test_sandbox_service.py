"""The sandbox as a service, over a real server on loopback (SQLite, the real warm pool).

One in-process server with `--sandbox-workers 2 --sandbox-queue 3`, a registered digits host,
and a slow suspect of the same interface (one wide layer applied many times, then the
key layer) so a run lasts long enough to be cancelled, crashed or crowded; ordinary suspects
(a fine-tuned copy, an independent model) and quick-failing ones (a torn upload, a file the
child refuses to load) for back-to-back runs. What is measured about the children comes
from the fork server itself (`SandboxPool.stats`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hostile_models
from freemark.derive import derive_key
from freemark.errors import (
    DeadlineExceededError,
    FreemarkError,
    InvalidModelError,
    SandboxBusyError,
    SandboxCrashedError,
    ServerError,
    TransportError,
)
from freemark.formats.pt2 import load_program, save_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.triggers import load_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import Rate, ServerConfig
from freemark_keyserver.sandbox.limits import REPLY_COPIES
from freemark_keyserver.sandbox.runner import LAYERS, SandboxPool
from freemark_keyserver.server import (
    ISOLATION_HEALTH_PREFIX,
    SANDBOX_HEALTH,
    RunningServer,
    create_server,
)
from freemark_keyserver.store import Principal
from ttp_fixtures import build_models, resident_peak, wide_suspect

WORKERS, QUEUE = 2, 3
# A Verify reads the 100 triggers alone (the registration has no panel): this wide a layer
# keeps a run busy for seconds.
WIDE = 2048


class Slow(torch.nn.Module):
    """The digits interface (1x8x8 in, a 128-unit `act` layer) at a few seconds per Verify."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, WIDE)
        self.wide = torch.nn.Linear(WIDE, WIDE)
        self.out = torch.nn.Linear(WIDE, 128)
        self.act = torch.nn.ReLU()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        for _ in range(self.repeats):
            h = torch.relu(self.wide(h))
        return self.act(self.out(h))


@dataclass
class World:
    running: RunningServer
    target: str
    token: str
    registration_id: str
    slow: Path
    ordinary: tuple[Path, ...]  # suspects that run to a verdict
    failing: tuple[Path, ...]  # suspects the child refuses at once (it exits by itself)

    @property
    def pool(self) -> SandboxPool:
        assert self.running.ctx.pool is not None
        return self.running.ctx.pool

    def client(self, timeout: float = 300) -> KeyServiceClient:
        return KeyServiceClient(self.target, token=self.token, retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("sandbox-service")
    files = build_models(folder)
    slow = folder / "slow.pt2"
    save_program(Slow(repeats=300).eval(), (torch.zeros(2, 1, 8, 8),), slow)
    failing = (hostile_models.truncated(files.host, folder / "torn.pt2"),
               hostile_models.with_native_code(files.host, folder / "native.pt2"))
    running = create_server(ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0",
                                         grace_seconds=1, sandbox_workers=WORKERS,
                                         sandbox_queue=QUEUE,
                                         # only the sandbox's cap is under test here
                                         max_calls_per_principal=32,
                                         verify_rate_principal=Rate.parse("off"),
                                         verify_rate_registration=Rate.parse("off")))
    token = new_token()
    running.ctx.store.add_principal(Principal("owner", "owner", hash_token(token), 0))
    bundle = derive_key(load_program(files.host), layer="act", owner="owner",
                        triggers=load_triggers(files.triggers))
    target = f"127.0.0.1:{running.port}"
    with KeyServiceClient(target, token=token, timeout=300) as owner:
        receipt = owner.register(bundle, files.host)
    yield World(running, target, token, receipt.registration_id, slow,
                (files.finetuned, files.independent), failing)
    running.stop(grace=1)


def _wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Poll until `condition()`; returns how long it took, fails past `seconds`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "timed out waiting"
        time.sleep(0.02)
    return time.monotonic() - started


def _children(pool: SandboxPool) -> list[int]:
    """Pids whose parent is the fork server: the running sandbox children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pool.pid:
            found.append(int(entry.name))
    return found


def _verify_in_thread(world: World, client: KeyServiceClient
                      ) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(client.verify(world.registration_id, world.slow))
        except (FreemarkError, grpc.RpcError, ValueError) as exc:
            outcome.append(exc)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


def test_a_cancelled_verify_kills_its_child_at_once_and_logs_nothing(world: World) -> None:
    size = world.running.ctx.store.tree_size()
    client = world.client()
    thread, _ = _verify_in_thread(world, client)
    _wait_for(lambda: world.pool.stats()["running"] == 1, 60)
    client.close()  # the channel goes: the call is cancelled
    took = _wait_for(lambda: world.pool.stats()["running"] == 0, 5)
    thread.join(10)
    assert took < 1.0, f"the child outlived the cancelled call by {took:.2f} s"
    time.sleep(0.5)  # had the run gone on, its verdict would be appended by now
    assert world.running.ctx.store.tree_size() == size


def test_a_verify_past_its_deadline_is_killed_and_logs_nothing(world: World) -> None:
    size = world.running.ctx.store.tree_size()
    with world.client(timeout=1.5) as client, pytest.raises((DeadlineExceededError,
                                                              TransportError)):
        client.verify(world.registration_id, world.slow)
    took = _wait_for(lambda: world.pool.stats()["running"] == 0, 5)
    assert took < 1.0
    time.sleep(0.5)
    assert world.running.ctx.store.tree_size() == size


def test_ten_verifies_on_two_workers_run_two_at_a_time_and_the_rest_queue_or_are_told_to_retry(
        world: World) -> None:
    world.pool.stats(reset=True)
    clients = [world.client() for _ in range(10)]
    runs = [_verify_in_thread(world, client) for client in clients]
    for thread, _ in runs:
        thread.join(300)
    outcomes = [outcome[0] for _, outcome in runs]
    for client in clients:
        client.close()
    stats = world.pool.stats()
    assert stats["high_water"] <= WORKERS
    busy = [o for o in outcomes if isinstance(o, SandboxBusyError)]
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(busy) + len(answered) == 10, outcomes
    assert len(answered) >= WORKERS  # the running two and what the queue held were served
    assert busy, "ten slow calls on two workers and a queue of three: some must be refused"
    assert all("retry in about" in str(o) for o in busy)


def test_a_crashing_child_is_a_clear_refusal_and_the_server_stays_serving(world: World) -> None:
    size = world.running.ctx.store.tree_size()
    with world.client() as client:
        thread, outcome = _verify_in_thread(world, client)
        _wait_for(lambda: bool(_children(world.pool)), 60)
        for pid in _children(world.pool):
            os.kill(pid, signal.SIGSEGV)  # what a heap overflow in an operator ends in
        thread.join(60)
    assert isinstance(outcome[0], SandboxCrashedError), outcome
    assert isinstance(outcome[0], ServerError) and "SIGSEGV" in str(outcome[0])
    assert world.running.ctx.store.tree_size() == size
    with grpc.insecure_channel(world.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    _wait_for(lambda: world.pool.stats()["running"] == 0, 5)


def test_health_names_each_isolation_layer_serving_exactly_when_the_pool_has_it(
        world: World) -> None:
    """`freemark.sandbox.isolation.<layer>` for every layer: SERVING where this server's pool
    found the layer on at start-up, NOT_SERVING where not; `limits` always holds (the pool
    refuses to start without it). Check and Watch agree; a name that is no layer is unknown."""
    isolation = world.pool.isolation
    assert set(isolation.layers) == set(LAYERS)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    expected = {layer: serving if isolation.on(layer) else not_serving for layer in LAYERS}
    with grpc.insecure_channel(world.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        def watch(service: str) -> int:
            stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            first = next(stream).status
            stream.cancel()
            return first

        checked = {layer: check(ISOLATION_HEALTH_PREFIX + layer) for layer in LAYERS}
        watched = {layer: watch(ISOLATION_HEALTH_PREFIX + layer) for layer in LAYERS}
        assert check("freemark.sandbox.isolation.limits") == serving  # the documented name
        with pytest.raises(grpc.RpcError) as unknown:
            check(ISOLATION_HEALTH_PREFIX + "nonsense")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert checked == expected, isolation.summary()
    assert watched == expected
    assert checked["limits"] == serving


def test_a_fork_server_that_dies_is_relaunched_and_its_run_is_told_to_retry(
        world: World) -> None:
    """Killed under a Verify (the OOM killer, say): its children die with it, the call is
    SANDBOX_BUSY with a retry hint and logs nothing, the pool relaunches the fork server with
    the same isolation, `freemark.sandbox` health is SERVING again, and the next Verify runs."""
    size = world.running.ctx.store.tree_size()
    restarts, dead, isolation = world.pool.restarts, world.pool.pid, world.pool.isolation
    assert dead is not None
    with world.client() as client:
        thread, outcome = _verify_in_thread(world, client)
        _wait_for(lambda: bool(_children(world.pool)), 60)
        orphans = _children(world.pool)
        os.kill(dead, signal.SIGKILL)
        thread.join(60)
    assert isinstance(outcome[0], SandboxBusyError) and "retry" in str(outcome[0]), outcome
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans), 10)
    _wait_for(lambda: world.pool.restarts == restarts + 1 and world.pool.alive, 120)
    assert world.pool.pid != dead and world.pool.isolation == isolation
    assert world.running.ctx.store.tree_size() == size
    with grpc.insecure_channel(world.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SANDBOX_HEALTH), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with world.client() as client:
        verdict = client.verify(world.registration_id, world.slow)
    assert verdict.outcome in ("match", "no_match", "inconclusive")
    assert world.running.ctx.store.tree_size() == size + 1


def test_forty_back_to_back_verifies_below_the_cap_are_never_told_the_sandbox_is_busy(
        world: World) -> None:
    """Issue 18, item 8: two callers, each with one call in flight at a time, send 40 Verify
    calls between them, quick-failing and ordinary suspects in turn, at a server with two
    workers. Never more runs than workers, so no call may be refused SANDBOX_BUSY: the pool
    frees a slot only once the fork server has reaped that slot's child, so the two caps
    agree. (Before, the pool let its slot go on the reply and a run admitted before the fork
    server saw the child go was refused "at its cap".)"""
    restarts = world.pool.restarts
    world.pool.stats(reset=True)
    suspects = [path for pair in zip(world.failing, world.ordinary) for path in pair]
    outcomes: list[list[object]] = [[], []]

    def caller(number: int) -> None:
        with world.client() as client:
            for call in range(20):
                suspect = suspects[(call + number) % len(suspects)]
                try:
                    outcomes[number].append((suspect, client.verify(world.registration_id,
                                                                    suspect)))
                except FreemarkError as exc:
                    outcomes[number].append((suspect, exc))
    callers = [threading.Thread(target=caller, args=(number,), daemon=True) for number in (0, 1)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(600)
    answered = [pair for per_caller in outcomes for pair in per_caller]
    assert len(answered) == 40
    busy = [outcome for _, outcome in answered if isinstance(outcome, SandboxBusyError)]
    assert not busy, f"{len(busy)} of 40 calls below the cap were refused: {busy[0]}"
    for suspect, outcome in answered:
        if suspect in world.failing:
            assert isinstance(outcome, InvalidModelError), (suspect.name, outcome)
        else:
            assert not isinstance(outcome, Exception), (suspect.name, outcome)
    assert world.pool.restarts == restarts  # the fork server never died under it
    assert world.pool.stats()["high_water"] <= WORKERS


REPLY_BYTES = 128 << 20  # activations the wide suspect's child sends back


def test_a_large_reply_costs_the_server_at_most_three_times_its_size(
        world: World, tmp_path: Path) -> None:
    """Issue 18, item 8: the reply is read into one buffer of its announced size and parsed
    in place; the only copy is the float64 activations, so a reply costs the server at most
    `REPLY_COPIES` (3) times its size, as the worker sizing budgets (main: 5.15 x). Measured
    as the rise of the server process's peak resident set during one Verify of a suspect
    whose key layer answers 128 MiB (the server runs in this process; the client's share is
    the small upload)."""
    suspect = wide_suspect(tmp_path / "wide.pt2", REPLY_BYTES, rows=100)
    # 100 x 335,552 units: not the key's width, refused once the reply is decoded
    with (world.client() as client, resident_peak() as rise,
          pytest.raises(FreemarkError) as refused):
        client.verify(world.registration_id, suspect)
    assert isinstance(refused.value, InvalidModelError), refused.value
    print(f"\none {REPLY_BYTES >> 20} MiB reply: server peak +{rise() >> 20} MiB "
          f"({rise() / REPLY_BYTES:.2f} x)")
    slack = 48 << 20  # the call's own buffers, the allocator's, the interpreter's
    assert rise() <= REPLY_COPIES * REPLY_BYTES + slack, (
        f"one {REPLY_BYTES >> 20} MiB reply raised the server's peak by {rise() >> 20} MiB")
