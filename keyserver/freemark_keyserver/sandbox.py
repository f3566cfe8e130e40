"""Run an untrusted model in a separate, limited process; get back only its activation matrix.

A suspect model is a program written by whoever uploaded it. The key server never loads one in
its own process, which holds the master key and every owner's keys. `run_in_sandbox` starts
`python -m freemark_keyserver.sandbox_worker` with:

- a minimal environment (`worker_environment`: PATH, PYTHONPATH to import our packages, thread
  counts, HOME and TMPDIR in a fresh directory), never the parent's, so no FREEMARK_* secret
  reaches it; the fresh directory is also its working directory and is removed afterwards;
- only stdin, stdout and stderr open (close_fds), in a new session so its whole process group
  can be killed at once;
- limits it applies to itself before importing anything (`SandboxLimits`).

The request (model path, layer, pooling, and the secret trigger inputs) goes over stdin as
`np.save` frames, never pickle and never a file. The parent enforces the wall-clock deadline,
caps what it reads, parses the answer with allow_pickle=False and checks it is a finite float64
(n_triggers, units) matrix. Errors are typed: the model's own problems come back as
`freemark.errors.ModelFileError` / `InvalidInputError` with the worker's one-line message;
the sandbox's as `SandboxError` and its subclasses. No traceback or trigger data crosses over.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import freemark
import freemark_keyserver
from freemark.errors import InvalidInputError, ModelFileError
from freemark.triggers import TriggerSet
from freemark_keyserver.sandbox_worker import EXIT_REFUSED, MAX_MESSAGE_CHARS

__all__ = [
    "SandboxError",
    "SandboxLimits",
    "SandboxResourceError",
    "SandboxTimeout",
    "run_in_sandbox",
    "worker_environment",
]

MiB = 1 << 20
GiB = 1 << 30
STDERR_TAIL_BYTES = 64 * 1024  # the worker's report is its last stderr line; older noise is dropped
_READ_CHUNK = 1 << 16
_PIPE_DRAIN_SECONDS = 5.0  # after the group is killed, how long to wait for the pipes to close


class SandboxError(Exception):
    """The sandbox could not produce activations for a reason other than the model file itself."""


class SandboxTimeout(SandboxError):
    """The worker ran past `SandboxLimits.wall_seconds` and was killed with its process group."""


class SandboxResourceError(SandboxError):
    """The worker hit its memory or CPU-time limit."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. The defaults fit the models the TTP is meant for.

    memory_bytes: RLIMIT_AS. 4 GiB: torch 2.13 (CPU) alone needs about 0.8 GiB of address space
        to import and run a small CNN (measured; 0.5 GiB fails), which leaves room for a model of
        a few hundred MB plus a 256-input batch of activations.
    cpu_seconds: RLIMIT_CPU. 120 s: importing torch costs 2-3 s, a digits CNN on 100 triggers
        under 1 s, a ResNet-50 on a few hundred triggers tens of seconds on one core.
    wall_seconds: the parent's deadline, which also bounds a worker that sleeps or blocks and
        so uses no CPU. Above cpu_seconds, so a busy single-threaded run meets the clearer CPU
        limit first.
    open_files: RLIMIT_NOFILE. 64: importing torch and loading a model need fewer than 8 at once.
    threads: torch/OpenMP/MKL threads. 1: RLIMIT_CPU counts every thread, a verify should not
        starve the server's other requests, and with one thread the worker can also forbid
        itself new processes and threads (RLIMIT_NPROC=0).
    max_output_bytes: cap on the activation matrix read back. 64 MiB: 8 bytes x 1,000 triggers x
        8,192 units.
    """

    memory_bytes: int = 4 * GiB
    cpu_seconds: int = 120
    wall_seconds: float = 180.0
    open_files: int = 64
    threads: int = 1
    max_output_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        for name in (
            "memory_bytes",
            "cpu_seconds",
            "wall_seconds",
            "open_files",
            "threads",
            "max_output_bytes",
        ):
            if not getattr(self, name) > 0:
                raise InvalidInputError(
                    f"SandboxLimits.{name} must be positive, got {getattr(self, name)}"
                )


def worker_environment(limits: SandboxLimits, home: Path) -> dict[str, str]:
    """The worker's whole environment: nothing is inherited, so no secret can leak into it."""
    threads = str(limits.threads)
    roots = dict.fromkeys(
        str(Path(p.__path__[0]).resolve().parent) for p in (freemark, freemark_keyserver)
    )
    return {
        "PATH": os.defpath,
        "PYTHONPATH": os.pathsep.join(roots),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(home),
        "TMPDIR": str(home),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
    }


def run_in_sandbox(
    model_path: Path,
    *,
    layer: str,
    pooling: int,
    triggers: TriggerSet,
    weights_path: Path | None = None,
    limits: SandboxLimits = SandboxLimits(),
) -> np.ndarray:
    """Activations only; see `run_model`."""
    return run_model(model_path, layer=layer, pooling=pooling, triggers=triggers,
                     weights_path=weights_path, limits=limits).activations


def run_model(
    model_path: Path,
    *,
    layer: str,
    pooling: int,
    triggers: TriggerSet,
    weights_path: Path | None = None,
    limits: SandboxLimits = SandboxLimits(),
    options: dict[str, str] | None = None,
) -> SandboxResult:
    """Activations ((len(triggers), units) float64) of `layer` of the `.pt2` at `model_path`.

    `weights_path` (`.safetensors`) replaces the program's weights. `options` name another
    format (`freemark_keyserver.formats.sandbox_options`) and go into the request. Raises ModelFileError for a
    file that is not a safe, vetted program; InvalidInputError when it cannot run on the
    triggers; SandboxTimeout, SandboxResourceError or SandboxError when the sandbox gives up.
    """
    for path in (model_path, weights_path):
        if path is not None and not Path(path).is_file():
            raise ModelFileError(f"{path}: no such file")
    request = _encode_request(model_path, weights_path, layer, pooling, triggers, options or {})
    with tempfile.TemporaryDirectory(prefix="freemark-sandbox-") as workdir:
        process = _start_worker(limits, Path(workdir))
        run = _Run(process, request, limits.max_output_bytes)
        timed_out = run.wait(limits.wall_seconds)
    if timed_out:
        raise SandboxTimeout(
            f"the model did not finish within {limits.wall_seconds:g} s and was killed"
        )
    return _decode(run, len(triggers), limits)


def _encode_request(
    model_path: Path, weights_path: Path | None, layer: str, pooling: int, triggers: TriggerSet,
    options: dict[str, str],
) -> bytes:
    header = {
        **options,
        "model": str(Path(model_path).resolve()),
        "weights": None if weights_path is None else str(Path(weights_path).resolve()),
        "layer": layer,
        "pooling": int(pooling),
        "has_mask": triggers.attention_mask is not None,
    }
    buffer = io.BytesIO()
    arrays = [np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), triggers.inputs]
    if triggers.attention_mask is not None:
        arrays.append(triggers.attention_mask)
    try:
        for array in arrays:
            np.save(buffer, np.asarray(array), allow_pickle=False)
    except ValueError as exc:  # object arrays would need pickle
        raise InvalidInputError(f"trigger arrays must be numeric: {exc}") from exc
    return buffer.getvalue()


def _start_worker(limits: SandboxLimits, workdir: Path) -> subprocess.Popen[bytes]:
    """Start a worker in `workdir`; it applies its limits, then waits for the request on stdin."""
    command = [
        sys.executable,
        "-s",
        "-B",
        "-P",
        "-m",
        "freemark_keyserver.sandbox_worker",
        "--memory-bytes",
        str(limits.memory_bytes),
        "--cpu-seconds",
        str(limits.cpu_seconds),
        "--open-files",
        str(limits.open_files),
        "--threads",
        str(limits.threads),
    ]
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=worker_environment(limits, workdir),
        cwd=workdir,
        close_fds=True,
        start_new_session=True,
    )


class _Run:
    """Feeds one worker its request and drains its pipes on threads, so neither side can block."""

    def __init__(self, process: subprocess.Popen[bytes], request: bytes, max_output: int) -> None:
        self.process = process
        self.output = bytearray()
        self.output_overflow = False
        self.errors: collections.deque[bytes] = collections.deque()
        self._error_bytes = 0
        self._max_output = max_output
        self._exited = threading.Event()
        self._threads = [
            threading.Thread(target=target, daemon=True)
            for target in (
                lambda: self._feed(request),
                self._read_output,
                self._read_errors,
                self._await_exit,
            )
        ]
        for thread in self._threads:
            thread.start()

    def wait(self, deadline: float) -> bool:
        """Wait for the worker; kill its process group at the deadline. True if it timed out."""
        timed_out = not self._exited.wait(deadline)
        # The leader is not reaped yet (waitid WNOWAIT), so its group id cannot have been reused:
        # killing the group also ends anything it started.
        self._kill_group()
        self._exited.wait()
        self.process.wait()
        for thread in self._threads:
            thread.join(_PIPE_DRAIN_SECONDS)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return timed_out

    def error_tail(self) -> str:
        return b"".join(self.errors).decode("utf-8", errors="replace")

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _await_exit(self) -> None:
        try:
            os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        finally:  # never leave wait() hanging, whatever waitid says
            self._exited.set()

    def _feed(self, request: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(request)
            self.process.stdin.close()
        except (
            OSError,
            ValueError,
        ):  # the worker died or stopped reading; its exit status tells why
            pass

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), _READ_CHUNK):
            if len(self.output) + len(chunk) > self._max_output:
                self.output_overflow = True
            else:
                self.output += chunk

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        while chunk := os.read(self.process.stderr.fileno(), _READ_CHUNK):
            self.errors.append(chunk)
            self._error_bytes += len(chunk)
            while self._error_bytes - len(self.errors[0]) >= STDERR_TAIL_BYTES:
                self._error_bytes -= len(self.errors.popleft())


def _decode(run: _Run, n_triggers: int, limits: SandboxLimits) -> SandboxResult:
    code = run.process.returncode
    if code == 0:
        if run.output_overflow:
            raise SandboxError(
                f"the worker's output exceeds max_output_bytes={limits.max_output_bytes}"
            )
        return _parse_output(bytes(run.output), n_triggers)
    if code == EXIT_REFUSED:
        raise _refusal(run.error_tail())
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        raise SandboxResourceError(
            f"the model ran past the CPU-time limit of {limits.cpu_seconds} s"
        )
    if code < 0:
        raise SandboxError(f"the worker died from signal {signal.Signals(-code).name}")
    raise SandboxError(f"the worker exited with status {code} without a report")


def _refusal(stderr_tail: str) -> Exception:
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    try:
        report = json.loads(lines[-1])
        kind, message = report["kind"], str(report["message"])[:MAX_MESSAGE_CHARS]
    except (IndexError, ValueError, TypeError, KeyError):
        return SandboxError("the worker failed without a readable report")
    if kind == "invalid_model":
        return ModelFileError(message)
    if kind == "invalid_input":
        return InvalidInputError(message)
    if kind == "resource":
        return SandboxResourceError(message)
    return SandboxError(f"the worker failed: {message}")


@dataclass(frozen=True)
class SandboxResult:
    """What a sandbox run hands back: activations and the model's identity, nothing else."""

    activations: np.ndarray
    fingerprint: bytes
    architecture_digest: bytes


IDENTITY_BYTES = 64


def _parse_output(raw: bytes, n_triggers: int) -> SandboxResult:
    """Two .npy frames: 64 identity bytes (fingerprint ‖ architecture digest), then activations."""
    buffer = io.BytesIO(raw)
    try:
        identity = np.load(buffer, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SandboxError("the worker's output is not a .npy array") from exc
    if not isinstance(identity, np.ndarray) or identity.dtype != np.uint8 or identity.shape != (
        IDENTITY_BYTES,
    ):
        raise SandboxError("the worker's output does not start with the model's identity")
    activations = _parse_activations(raw[buffer.tell():], n_triggers)
    data = identity.tobytes()
    return SandboxResult(activations, data[:32], data[32:])


def _parse_activations(raw: bytes, n_triggers: int) -> np.ndarray:
    buffer = io.BytesIO(raw)
    try:
        array = np.load(buffer, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SandboxError("the worker's output is not a .npy array") from exc
    if not isinstance(array, np.ndarray) or buffer.tell() != len(raw):
        raise SandboxError("the worker's output is not exactly one .npy array")
    if (
        array.dtype != np.dtype(np.float64)
        or array.ndim != 2
        or array.shape[0] != n_triggers
        or array.shape[1] < 1
    ):
        raise SandboxError(
            f"the worker returned a {array.dtype} array of shape {array.shape}, "
            f"expected float64 ({n_triggers}, units)"
        )
    if not np.all(np.isfinite(array)):
        raise SandboxError("the worker returned non-finite activations")
    return array
