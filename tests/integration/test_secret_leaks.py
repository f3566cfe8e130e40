"""No secret trigger leaves the key server through an error, a log line or a latency (issue 18,
items 1 and 4), over a real server on loopback with a real store and the real sandbox.

Owner A registers the digits host with 100 secret triggers. Hostile suspects then try to read
them back: the gather-index trick (15 trigger pixels packed into one out-of-range index,
whose error names it) as a `.pt2` and as ONNX, through Verify and through Register's
prior-claim run on A's key; runs that fail on A's triggers in different ways must answer
with one fixed refusal and leave only class names in the operator's log; and a Register
whose run fails on A's triggers must take as long as one whose run does not.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_models
from freemark.derive import derive_key
from freemark.errors import ServerError
from freemark.formats.pt2 import load_program, save_program
from freemark.rpc import KeyServiceClient
from freemark.scheme.bundle import KeyBundle
from freemark.scheme.triggers import TriggerSet, load_triggers, select_triggers
from freemark_keyserver.auth import hash_token, new_token
from freemark_keyserver.config import UNLIMITED, ServerConfig
from freemark_keyserver.sandbox.runner import RUN_FAILED
from freemark_keyserver.server import RunningServer, create_server
from freemark_keyserver.store import Principal
from freemark_lab import data
from freemark_lab.models import MnistCNN
from ttp_fixtures import ModelFiles, build_models

PRINCIPALS = (("owner_a", "owner"), ("owner_b", "owner"), ("arbiter", "arbiter"))
B_SCALE = 1 / 40  # B's own triggers, dimmed: every packed pixel rounds to level 0
CHAIN = 100  # rounds of the expensive 512-wide chain after the value-dependent fault
CALLS = 10  # Register calls each way in the timing test (interleaved, so noise hits both)


class _Lines(logging.Handler):
    """Every record of the server's logger, formatted with any exception it carries."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class World:
    running: RunningServer
    tokens: dict[str, str]
    files: ModelFiles
    a_triggers: TriggerSet
    log: _Lines

    def client(self, caller: str) -> KeyServiceClient:
        return KeyServiceClient(f"127.0.0.1:{self.running.port}", token=self.tokens[caller],
                                timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("leaks")
    files = build_models(folder)
    config = ServerConfig(data_dir=folder / "ttp", listen="127.0.0.1:0", grace_seconds=5,
                          verify_rate_principal=UNLIMITED, verify_rate_registration=UNLIMITED,
                          register_rate_principal=UNLIMITED)
    running = create_server(config)
    tokens = {name: new_token() for name, _ in PRINCIPALS}
    for name, role in PRINCIPALS:
        running.ctx.store.add_principal(Principal(name, role, hash_token(tokens[name]), 0))
    lines = _Lines()
    logger = logging.getLogger("freemark_keyserver")
    logger.addHandler(lines)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    a_triggers = load_triggers(files.triggers)
    w = World(running, tokens, files, a_triggers, lines)
    with w.client("owner_a") as client:  # A's secret: 100 trigger images, no panel
        client.register(derive_key(load_program(files.host), layer="act", owner="owner_a",
                                   triggers=a_triggers), files.host)
    try:
        yield w
    finally:
        logger.removeHandler(lines)
        logger.setLevel(previous)
        running.stop(grace=1)


def _registration(w: World) -> str:
    with w.client("owner_a") as client:
        return next(r.registration_id for r in client.list_registrations())


def _secrets(w: World) -> list[str]:
    """What the trick would read out: the packed index of each of A's triggers, in decimal
    (each names 15 of its pixels), and the pixels themselves as torch prints them."""
    packed = [str(i) for i in hostile_models.packed_indices(w.a_triggers.inputs) if i >= 10**6]
    assert len(packed) > 90  # the trick has something to read on nearly every trigger
    return packed


def _leaks(w: World, text: str) -> list[str]:
    return [s for s in _secrets(w) if s in text]


def _refusal(call: object) -> ServerError | None:
    try:
        call()  # type: ignore[operator]
    except ServerError as exc:
        return exc
    return None


def _b_key(model: Path) -> KeyBundle:
    """Owner B's key on his own upload, on dim triggers the upload runs on without failing."""
    ds = data.digits()
    mine = select_triggers(ds.x_train, ds.y_train, per_class=2, seed=5)
    dim = TriggerSet(inputs=(mine.inputs * B_SCALE).astype(np.float32))
    return derive_key(load_program(model), layer="act", owner="owner_b", triggers=dim)


def test_the_gather_trick_reads_no_trigger_out_of_verify(world: World, tmp_path: Path) -> None:
    """The stolen host with A's trigger pixels packed into a gather index, as `.pt2` and as
    ONNX: the `.pt2` is refused at vetting, before a trigger is read, naming the node; the
    ONNX graph's gather index is clamped, so it runs and fails on no value. Neither answer
    nor any log line holds a packed index."""
    registration = _registration(world)
    pt2 = hostile_models.packing_gather(tmp_path / "packing.pt2", world.files.host_state)
    onnx = hostile_models.packing_gather_onnx(tmp_path / "packing.onnx", world.files.host_state)
    start = len(world.log.lines)
    with world.client("arbiter") as client:
        refused = _refusal(lambda: client.verify(registration, pt2))
        verdict = client.verify(registration, onnx)
    assert refused is not None and refused.reason == "INVALID_MODEL", refused
    assert "indexes with" in refused.message and "computed from the inputs' values" in \
        refused.message, refused.message
    assert verdict.outcome == "match"  # the clamped graph is read like the stolen copy it is
    logged = "\n".join(world.log.lines[start:])
    assert not _leaks(world, refused.message + str(verdict) + logged)


def test_failing_runs_on_the_triggers_answer_one_fixed_refusal(world: World,
                                                                tmp_path: Path) -> None:
    """Two suspects that pass vetting and fail on A's triggers in different ways (non-finite
    activations; a shape that does not fit them) get the same status and the same fixed
    text, and the operator's log names the exception's class, never the model's words."""
    registration = _registration(world)
    nan = hostile_models.nan_on_bright(tmp_path / "nan.pt2", 0.5)
    wrong_shape = tmp_path / "mnist.pt2"
    save_program(MnistCNN().eval(), (torch.zeros(2, 1, 28, 28),), wrong_shape)
    start = len(world.log.lines)
    with world.client("arbiter") as client:
        answers = [_refusal(lambda path=path: client.verify(registration, path))
                   for path in (nan, wrong_shape)]
    assert all(a is not None for a in answers), answers
    said = {(a.code, a.reason, a.message) for a in answers if a is not None}
    assert len(said) == 1, said
    assert answers[0] is not None and answers[0].reason == "INVALID_MODEL"
    assert answers[0].message.endswith(RUN_FAILED), answers[0].message
    logged = "\n".join(world.log.lines[start:])
    assert "InvalidInputError" in logged  # what the operator learns: the class
    for words in ("non-finite", "cannot be multiplied", "shape"):
        assert words not in logged, logged


def test_registers_prior_claim_run_leaks_nothing_of_the_other_owners_triggers(
        world: World, tmp_path: Path) -> None:
    """Owner B registers uploads that run on his own (dim) triggers but fail on A's, in
    Register's prior-claim run against A's key: the gather trick is refused at vetting;
    a model whose activations go non-finite on A's triggers cannot be read at A's key
    width (a tensor that is not finite is not one a key reads: no claim, nothing logged of
    it). B's own file as his reference ends each call after the prior-claim run (a panel
    needs models other than the host), so nothing is registered."""
    gather = hostile_models.packing_gather(tmp_path / "b-gather.pt2")
    nan = hostile_models.nan_on_bright(tmp_path / "b-nan.pt2", 0.5)
    start = len(world.log.lines)
    with world.client("owner_b") as client:
        answers = {path.name: _refusal(lambda path=path: client.register(
            _b_key(path), path, references=[path])) for path in (gather, nan)}
        assert list(client.list_registrations()) == []
    gathered, failed = answers["b-gather.pt2"], answers["b-nan.pt2"]
    assert gathered is not None and gathered.reason == "INVALID_MODEL"
    assert "indexes with" in gathered.message
    assert failed is not None and "same weights as the host" in failed.message
    logged = "\n".join(world.log.lines[start:])
    assert "non-finite" not in logged and not _leaks(world, logged + str(answers)), logged


def test_register_latency_does_not_depend_on_the_other_owners_triggers(
        world: World, tmp_path: Path) -> None:
    """A fail-fast probe (the gather trick before an expensive chain) is refused at vetting;
    the closest admissible model, a value-dependent fault (a square root of a negative) before
    the same chain, fails on A's triggers at threshold 0.5 and on none at 5.0. Registers of
    the two, interleaved, take the same time: difference of medians within 3 MADs or 10 %."""
    gather = hostile_models.packing_gather(tmp_path / "fast.pt2", chain=CHAIN)
    failing = hostile_models.nan_on_bright(tmp_path / "fails.pt2", 0.5, chain=CHAIN)
    passing = hostile_models.nan_on_bright(tmp_path / "passes.pt2", 5.0, chain=CHAIN)
    keys = {path: _b_key(path) for path in (failing, passing)}
    times: dict[Path, list[float]] = {failing: [], passing: []}
    with world.client("owner_b") as client:
        refused = _refusal(lambda: client.register(_b_key(gather), gather))
        assert refused is not None and "indexes with" in refused.message
        for path in (failing, passing):  # warm both once
            _refusal(lambda path=path: client.register(keys[path], path, references=[path]))
        start = len(world.log.lines)
        for _ in range(CALLS):
            for path in (failing, passing):
                began = time.perf_counter()
                answer = _refusal(lambda path=path: client.register(keys[path], path,
                                                                    references=[path]))
                times[path].append(time.perf_counter() - began)
                assert answer is not None and "same weights as the host" in answer.message
    assert not _leaks(world, "\n".join(world.log.lines[start:]))
    fails, passes = statistics.median(times[failing]), statistics.median(times[passing])
    spread = max(_mad(times[failing]), _mad(times[passing]))
    print(f"Register latency, median over {CALLS}: fails on A's triggers {fails:.3f} s, "
          f"passes {passes:.3f} s, MAD {spread:.3f} s")
    assert abs(fails - passes) <= max(3 * spread, 0.1 * min(fails, passes)), times


def _mad(values: list[float]) -> float:
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values)
