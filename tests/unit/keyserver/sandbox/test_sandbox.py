"""The sandbox with real models and worker processes: results, isolation, limits, hostile files.

Each worker imports torch (a few seconds of CPU), so the file runs as few as it can.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hostile_models
from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats.pt2 import (
    apply_weights,
    fingerprint,
    load_program,
    save_program,
    shape_digest,
    state_dict_of,
)
from freemark.scheme.activations import capture, output_scores
from freemark.scheme.probes import with_probes
from freemark.scheme.triggers import TriggerSet, select_triggers
from freemark.v1 import bundle_pb2
from freemark_keyserver.sandbox import protocol as sandbox_protocol
from freemark_keyserver.sandbox.limits import (
    REPLY_COPIES,
    GiB,
    MiB,
    SandboxLimits,
    worker_environment,
)
from freemark_keyserver.sandbox.pool import SandboxPool
from freemark_keyserver.sandbox.protocol import ModelIdentity, TriggerRun
from freemark_keyserver.sandbox.runner import (
    SandboxError,
    SandboxResourceError,
    SandboxTimeout,
    default_workers,
    run_batch,
    run_in_sandbox,
    run_model,
    shared_pool,
)
from freemark_lab.data import digits
from freemark_lab.models import DigitsCNN
from freemark_lab.train import trained

LAYER = "act"
POOLING = bundle_pb2.POOLING_NONE
MASTER_KEY = "FREEMARK_MASTER_KEY"
DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class Host:
    """A trained DigitsCNN saved as .pt2, and secret triggers from held-out digits."""

    path: Path
    triggers: TriggerSet


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    data = digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin against the workers on a shared 2-core box
    try:
        model = trained(DigitsCNN, data.x_train, data.y_train, epochs=3, seed=0)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("sandbox") / "digits.pt2"
    save_program(model, (torch.from_numpy(data.x_train[:2]),), path)
    triggers = select_triggers(data.x_test, data.y_test, per_class=3)
    return Host(path, TriggerSet(inputs=triggers.inputs))


def _reference(
    model: torch.export.ExportedProgram | torch.nn.Module, triggers: TriggerSet
) -> np.ndarray:
    return capture(model, LAYER, triggers, pooling=POOLING)[0]


def _sandboxed(
    path: Path,
    triggers: TriggerSet,
    *,
    weights_path: Path | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    return run_in_sandbox(
        path,
        layer=LAYER,
        pooling=POOLING,
        triggers=triggers,
        weights_path=weights_path,
        limits=limits,
    )


def test_activations_match_in_process_capture(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MASTER_KEY, "parent-only secret")
    activations = _sandboxed(host.path, host.triggers)
    assert activations.dtype == np.float64 and activations.shape == (len(host.triggers), 128)
    np.testing.assert_allclose(
        activations, _reference(load_program(host.path), host.triggers), rtol=1e-5, atol=1e-6
    )


def test_the_child_builds_the_alignment_probes_from_the_triggers(host: Host) -> None:
    """Only the triggers cross over; the rows after them are the probes the owner's library
    derives (`with_probes`), read at the same layer."""
    result = run_model(host.path, layer=LAYER, pooling=POOLING, triggers=host.triggers, probes=40)
    expected = _reference(load_program(host.path), with_probes(host.triggers, 40))
    assert result.activations.shape == (len(host.triggers) + 40, 128)
    np.testing.assert_allclose(result.activations, expected, rtol=1e-5, atol=1e-6)


def test_a_probes_only_run_answers_the_probe_rows_alone(host: Host) -> None:
    """`TriggerRun.probes_only` (Register's claim signatures, issue 20): the child derives
    the probes from the triggers but runs only them; a run and a scan answer exactly the
    probe rows a full run answers after its triggers."""
    full = TriggerRun(LAYER, POOLING, host.triggers, probes=12)
    alone = TriggerRun(LAYER, POOLING, host.triggers, probes=12, probes_only=True)
    scan = TriggerRun(None, POOLING, host.triggers, probes=12, width=128)
    scan_alone = TriggerRun(None, POOLING, host.triggers, probes=12, width=128, probes_only=True)
    assert (alone.rows, full.rows) == (12, len(host.triggers) + 12)
    _, results = run_batch(host.path, [full, alone, scan, scan_alone])
    ran, probed, scanned, scanned_alone = results
    assert isinstance(ran, np.ndarray) and isinstance(probed, np.ndarray)
    assert probed.shape == (12, 128)
    np.testing.assert_allclose(probed, ran[len(host.triggers):], rtol=1e-5, atol=1e-6)
    assert isinstance(scanned, sandbox_protocol.LayerScan)
    assert isinstance(scanned_alone, sandbox_protocol.LayerScan)
    assert scanned_alone.widths == scanned.widths and scanned_alone.shape[0] == 12
    np.testing.assert_allclose(np.asarray(scanned_alone),
                               np.asarray(scanned)[len(host.triggers):], rtol=1e-5, atol=1e-6)


def test_a_verify_need_not_hash_the_weights(host: Host) -> None:
    """`SKIP_FINGERPRINT`: the same activations and architecture digest, zeros for the
    weights' fingerprint (Verify binds the upload's SHA-256 instead)."""
    hashed = run_model(host.path, layer=LAYER, pooling=POOLING, triggers=host.triggers)
    skipped = run_model(host.path, layer=LAYER, pooling=POOLING, triggers=host.triggers,
                        options=sandbox_protocol.SKIP_FINGERPRINT)
    assert hashed.fingerprint == fingerprint(load_program(host.path))
    assert skipped.fingerprint == bytes(32)
    assert skipped.architecture_digest == hashed.architecture_digest
    np.testing.assert_array_equal(skipped.activations, hashed.activations)


def test_follow_up_runs_reuse_the_child_that_read_the_model(host: Host) -> None:
    """`then` sees the first answer while the child still holds the model, and its runs are
    read by that same child (one fork, one load); a follow-up set that fails fails alone."""
    pool = shared_pool()
    forked = pool.stats()["forked"]
    seen: list[tuple[bytes, int]] = []

    def then(identity: ModelIdentity, results: list[np.ndarray | Exception]) -> list[TriggerRun]:
        seen.append((identity, len(results)))
        if len(seen) > 1:  # asked again with every answer so far: nothing more
            return []
        return [TriggerRun(LAYER, POOLING, host.triggers, probes=5),
                TriggerRun("no_such_layer", POOLING, host.triggers)]

    identity, results = pool.run(host.path, [TriggerRun(LAYER, POOLING, host.triggers)],
                                 weights_path=None, limits=DEFAULT_LIMITS, then=then)
    assert pool.stats()["forked"] == forked + 1
    assert seen == [(identity, 1), (identity, 3)] and len(results) == 3
    first, again, missing = results
    assert isinstance(first, np.ndarray) and isinstance(again, np.ndarray)
    assert again.shape == (len(host.triggers) + 5, 128)
    np.testing.assert_array_equal(again[:len(host.triggers)], first)
    assert isinstance(missing, Exception) and "no_such_layer" in str(missing)


def test_an_outputs_run_answers_the_models_scores_as_the_library_reads_them(host: Host
                                                                         ) -> None:
    """`TriggerRun.outputs_of`: the child answers the model's log-probabilities, the numbers
    `freemark.scheme.activations.output_scores` gives in process (one reading of outputs),
    beside a layer run of the same load."""
    identity, results = shared_pool().run(
        host.path, [TriggerRun.outputs_of(host.triggers.inputs),
                    TriggerRun(LAYER, POOLING, host.triggers)],
        weights_path=None, limits=DEFAULT_LIMITS)
    scores, layer = results
    assert isinstance(scores, np.ndarray) and scores.shape == (len(host.triggers), 10)
    expected = output_scores(load_program(host.path), host.triggers.inputs)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(np.exp(scores).sum(axis=1), 1.0, rtol=1e-4)
    assert isinstance(layer, np.ndarray) and layer.shape == (len(host.triggers), 128)
    assert identity.fingerprint == fingerprint(load_program(host.path))
    assert isinstance(scores, sandbox_protocol.OutputScores)
    assert scores.architecture == shape_digest(load_program(host.path))


def test_a_claim_outputs_run_answers_nothing_for_inputs_the_model_does_not_take(
        host: Host) -> None:
    """`outputs_of(..., claim=True)`, Register's check of an earlier output key: inputs of
    another shape than the model declares get an empty (n, 0) answer (not a copy: no
    claim), decided on the declaration; inputs it takes get its scores as usual."""
    other = np.zeros((3, 5, 5), dtype=host.triggers.inputs.dtype)
    _, results = shared_pool().run(
        host.path, [TriggerRun.outputs_of(other, claim=True),
                    TriggerRun.outputs_of(host.triggers.inputs, claim=True)],
        weights_path=None, limits=DEFAULT_LIMITS)
    empty, scores = results
    assert isinstance(empty, sandbox_protocol.OutputScores) and empty.shape == (3, 0)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(host.triggers), 10)


def test_one_childs_replies_together_stay_under_the_output_cap(host: Host) -> None:
    """`max_output_bytes` caps everything read back from one child (issue 18, item 8): a
    follow-up reply that would take the total past it is refused before it is read, as each
    of its runs' result, so a Register's host reading and its scans never hold more than
    one cap in the server."""
    first = len(host.triggers) * 128 * 4  # float32 activations of the act layer
    limits = SandboxLimits(max_output_bytes=first + first // 2)  # room for the frames too
    run = TriggerRun(LAYER, POOLING, host.triggers)
    _, results = shared_pool().run(  # one follow-up: `then` is asked until it returns no run
        host.path, [run], weights_path=None, limits=limits,
        then=lambda identity, results: [run] if len(results) == 1 else [])
    alone, again = results
    assert isinstance(alone, np.ndarray) and alone.shape == (len(host.triggers), 128)
    assert isinstance(again, SandboxError) and "exceeds max_output_bytes" in str(again)


def test_safetensors_weights_replace_the_programs_own(host: Host, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weights = {
            name: (t + 0.1 * torch.randn(t.shape, generator=generator)).contiguous()
            for name, t in state_dict_of(load_program(host.path)).items()
        }
    weights_path = tmp_path / "suspect.safetensors"
    save_file(weights, str(weights_path))
    expected = _reference(apply_weights(load_program(host.path), weights_path), host.triggers)
    assert not np.allclose(expected, _reference(load_program(host.path), host.triggers))
    activations = _sandboxed(host.path, host.triggers, weights_path=weights_path)
    np.testing.assert_allclose(activations, expected, rtol=1e-5, atol=1e-6)


def test_worker_environment_is_built_from_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MASTER_KEY, "parent-only secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also not for the worker")
    environment = worker_environment(SandboxLimits(threads=3), tmp_path)
    assert set(environment) == {
        "PATH",
        "PYTHONPATH",
        "PYTHONDONTWRITEBYTECODE",
        "HOME",
        "TMPDIR",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
    }
    assert environment["HOME"] == environment["TMPDIR"] == str(tmp_path)
    assert environment["OMP_NUM_THREADS"] == "3"
    assert "parent-only secret" not in "".join(environment.values())


def test_fork_server_has_no_secrets_and_no_inherited_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MASTER_KEY, "parent-only secret")
    inherited = os.open(tmp_path / "parent-file", os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(inherited, True)
    pool = SandboxPool(workers=1, queue=0, limits=DEFAULT_LIMITS).start()
    try:
        assert pool.pid is not None
        proc = Path(f"/proc/{pool.pid}")
        environ = dict(
            entry.split("=", 1) for entry in (proc / "environ").read_text().split("\0") if entry
        )
        assert MASTER_KEY not in environ and "parent-only secret" not in "".join(environ.values())
        assert set(environ) == set(worker_environment(DEFAULT_LIMITS, tmp_path))
        open_files = {os.readlink(proc / "fd" / fd) for fd in os.listdir(proc / "fd")}
        assert str(tmp_path / "parent-file") not in open_files
    finally:
        os.close(inherited)
        pool.close()


def test_unknown_layer_is_an_invalid_input_not_a_bad_model(host: Host) -> None:
    with pytest.raises(InvalidInputError, match="no layer named 'fc9'") as refused:
        run_in_sandbox(host.path, layer="fc9", pooling=POOLING, triggers=host.triggers)
    assert not isinstance(refused.value, ModelFileError)


def test_the_default_worker_count_budgets_what_each_workers_replies_cost() -> None:
    """A worker costs its child's address space and, in the server, up to `REPLY_COPIES`
    times the output cap (issue 18, item 8): a reply cap no machine can hold thrice leaves
    one worker where a tiny one allows one per core."""
    assert SandboxLimits().reply_bytes == REPLY_COPIES * 512 * MiB == 1536 * MiB
    assert default_workers(SandboxLimits(memory_bytes=MiB, max_output_bytes=1)) == os.cpu_count()
    assert default_workers(SandboxLimits(memory_bytes=MiB, max_output_bytes=1 << 50)) == 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)


def test_the_memory_limit_follows_the_model_size() -> None:
    limits = SandboxLimits()
    assert limits.for_model(0).memory_bytes == limits.memory_bytes == 4 * GiB
    assert limits.for_model(2 * GiB).memory_bytes == 4 * GiB + 3 * GiB  # base + 1.5 x weights
    assert limits.for_model(100 * GiB).memory_bytes == limits.max_memory_bytes == 16 * GiB
    assert limits.for_model(GiB).max_parameters == limits.max_parameters
    with pytest.raises(InvalidInputError, match="max_memory_bytes"):
        SandboxLimits(memory_bytes=8 * GiB, max_memory_bytes=4 * GiB)
    with pytest.raises(InvalidInputError, match="max_parameters"):
        SandboxLimits(max_parameters=0)


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _reply(*arrays: np.ndarray, status: bytes = sandbox_protocol.OK) -> bytes:
    identity = np.zeros(64, dtype=np.uint8)
    ok = np.frombuffer(b'{"kind": "ok", "message": ""}', dtype=np.uint8)
    return status + _npy(identity) + b"".join(_npy(ok) + _npy(a) for a in arrays)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (sandbox_protocol.OK + _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True),
         "not a .npy array"),
        (b"not numpy at all", "no status"),
        (sandbox_protocol.OK + b"not numpy at all", "not a .npy array"),
        (_reply(np.zeros((3, 4), dtype=np.float32)) + b"extra", "trailing"),
        (_reply(np.zeros((3, 4))), "float64"),
        (_reply(np.zeros((2, 4), dtype=np.float32)), r"\(2, 4\)"),
        (_reply(np.zeros(3, dtype=np.float32)), r"\(3,\)"),
        (_reply(np.full((3, 4), np.nan, dtype=np.float32)), "non-finite"),
    ],
)
def test_worker_output_is_parsed_without_pickle_and_checked(raw: bytes, why: str) -> None:
    """What a compromised worker could send back never becomes a Python object or bad matrix."""
    with pytest.raises(SandboxError, match=why):
        sandbox_protocol.decode_reply(raw, [3])


def test_a_frame_announcing_more_than_the_reply_holds_is_refused() -> None:
    """Frames are read in place: a header whose shape asks for more bytes than follow it
    is a broken reply, never a read past the buffer."""
    frame = _npy(np.zeros((3, 4), dtype=np.float32))
    lying = frame.replace(b"(3, 4)", b"(3, 9)")
    raw = _reply(np.zeros((3, 4), dtype=np.float32)).replace(frame, lying)
    with pytest.raises(SandboxError, match="not a .npy array"):
        sandbox_protocol.decode_reply(raw, [3])


def test_a_scan_is_decoded_in_place_and_a_run_is_its_one_float64_copy() -> None:
    """A scan's matrix is a view on the reply's own buffer (no copy), each tensor handed out
    as a view too; a run's activations are the one float64 copy (issue 18, item 8)."""
    layers = [("a", np.ones((3, 2), dtype=np.float32)), ("b", np.full((3, 5), 2.0, dtype=np.float32))]
    raw = bytearray(sandbox_protocol.encode_reply(bytes(64), [
        sandbox_protocol.LayerScan.of(3, layers), np.arange(12, dtype=np.float32).reshape(3, 4)]))
    _, (scan, run) = sandbox_protocol.decode_reply(raw, [3, 3], [True, False])
    assert isinstance(scan, sandbox_protocol.LayerScan) and scan.dtype == np.float32
    buffer = np.frombuffer(raw, dtype=np.uint8)
    assert np.shares_memory(scan, buffer)
    assert all(np.shares_memory(layer, buffer) for layer in scan.layers())
    assert isinstance(run, np.ndarray) and run.dtype == np.float64
    assert not np.shares_memory(run, buffer)


def test_float32_wire_keeps_float64_results() -> None:
    activations = np.arange(12, dtype=np.float32).reshape(3, 4)
    _, results = sandbox_protocol.decode_reply(_reply(activations), [3])
    assert isinstance(results[0], np.ndarray) and results[0].dtype == np.float64
    np.testing.assert_array_equal(results[0], activations)


def _many(triggers: TriggerSet, times: int = 2000) -> TriggerSet:
    """Enough inputs to keep a warm child busy for seconds."""
    return TriggerSet(inputs=np.repeat(triggers.inputs, times, axis=0))


def test_wall_clock_deadline_kills_the_worker(host: Host) -> None:
    shared_pool()  # started (seconds of imports) before the clock runs
    started = time.monotonic()
    with pytest.raises(SandboxTimeout, match="0.3 s"):
        _sandboxed(host.path, _many(host.triggers), limits=SandboxLimits(wall_seconds=0.3))
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 2
    while shared_pool().stats()["running"]:
        assert time.monotonic() < deadline, "the killed child is still running"
        time.sleep(0.05)


def test_too_little_memory_is_a_resource_error(host: Host) -> None:
    with pytest.raises(SandboxResourceError, match="sandbox limit"):
        _sandboxed(host.path, host.triggers, limits=SandboxLimits(memory_bytes=256 << 20))


def test_cpu_time_limit_is_a_resource_error(host: Host) -> None:
    with pytest.raises(SandboxResourceError, match="CPU-time limit of 1 s"):
        _sandboxed(host.path, _many(host.triggers, 8000), limits=SandboxLimits(cpu_seconds=1))


HOSTILE: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "pickled sample inputs": (
        hostile_models.pickled_sample_inputs,
        "sample inputs need unpickling",
    ),
    "pickled weights": (hostile_models.pickled_weights, "stored pickled"),
    "AOTInductor .so": (
        lambda src, dst, _canary: hostile_models.with_native_code(src, dst),
        "AOTInductor compiled code",
    ),
    "random bytes": (
        lambda _src, dst, _canary: hostile_models.random_bytes(dst),
        "not a torch.export",
    ),
    "truncated": (
        lambda src, dst, _canary: hostile_models.truncated(src, dst),
        "not a torch.export",
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_file_is_refused_without_side_effects(
    host: Host, tmp_path: Path, attack: str
) -> None:
    build, why = HOSTILE[attack]
    canary = tmp_path / "canary"
    hostile = build(host.path, tmp_path / "suspect.pt2", canary)
    with pytest.raises(ModelFileError, match=why) as refused:
        _sandboxed(hostile, host.triggers)
    assert not canary.exists()
    assert "Traceback" not in str(refused.value)


def test_graph_reading_a_server_file_is_vetted_out_in_the_worker(
    host: Host, tmp_path: Path
) -> None:
    secret = tmp_path / "master.key"
    secret.write_bytes(np.arange(128, dtype=np.float32).tobytes())
    hostile = hostile_models.reading_file(
        host.path, tmp_path / "suspect.pt2", secret, after="relu_2"
    )
    with pytest.raises(ModelFileError, match="aten::from_file"):
        _sandboxed(hostile, host.triggers)


def test_regression_plain_torch_export_load_runs_pickled_payloads(
    host: Host, tmp_path: Path
) -> None:
    """Why load_program exists: torch 2.13's own loader executes both payloads.

    Run in a throwaway interpreter so the payload cannot touch the test process.
    """
    canaries = {name: tmp_path / f"canary-{name}" for name in ("sample-inputs", "weights")}
    files = [
        hostile_models.pickled_sample_inputs(
            host.path, tmp_path / "inputs.pt2", canaries["sample-inputs"]
        ),
        hostile_models.pickled_weights(host.path, tmp_path / "weights.pt2", canaries["weights"]),
    ]
    script = textwrap.dedent("""
        import sys, torch
        for path in sys.argv[1:]:
            try:
                torch.export.load(path)
            except Exception:  # the weights file fails verification, after unpickling
                pass
    """)
    subprocess.run(
        [sys.executable, "-c", script, *map(str, files)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert {name: path.exists() for name, path in canaries.items()} == {
        "sample-inputs": True,
        "weights": True,
    }


def test_a_scan_reply_keeps_its_tensors_apart_and_is_checked() -> None:
    """A scan (`TriggerRun` with no layer) answers a `LayerScan`: each tensor's columns, as the
    child said, with its name, checked like any matrix; widths or names that do not fit, or a
    scan where none was asked for (or the reverse), break the protocol."""
    layers = [np.ones((3, 2), dtype=np.float32), np.full((3, 5), 2.0, dtype=np.float32)]
    named = [("relu", layers[0]), ("/act/Relu_output_0", layers[1])]
    raw = sandbox_protocol.encode_reply(bytes(64), [sandbox_protocol.LayerScan.of(3, named)])
    _, results = sandbox_protocol.decode_reply(raw, [3], [True])
    scan = results[0]
    assert isinstance(scan, sandbox_protocol.LayerScan) and scan.widths == (2, 5)
    assert scan.names == ("relu", "/act/Relu_output_0")
    long_name = sandbox_protocol.LayerScan.of(3, [("x" * 1025, layers[0])])
    with pytest.raises(SandboxError, match="names do not fit"):
        sandbox_protocol.decode_reply(sandbox_protocol.encode_reply(bytes(64), [long_name]),
                                      [3], [True])
    for got, sent in zip(scan.layers(), layers, strict=True):
        np.testing.assert_array_equal(got, sent)
    empty = sandbox_protocol.encode_reply(bytes(64), [sandbox_protocol.LayerScan.of(3, [])])
    _, results = sandbox_protocol.decode_reply(empty, [3], [True])
    assert isinstance(results[0], sandbox_protocol.LayerScan) and results[0].layers() == []
    with pytest.raises(SandboxError, match="not asked for"):
        sandbox_protocol.decode_reply(raw, [3], [False])
    with pytest.raises(SandboxError, match="not asked for"):
        sandbox_protocol.decode_reply(_reply(layers[0]), [3], [True])
    lying = raw.replace(b'"widths": [2, 5]', b'"widths": [2, 6]')
    with pytest.raises(SandboxError, match="widths"):
        sandbox_protocol.decode_reply(lying, [3], [True])
