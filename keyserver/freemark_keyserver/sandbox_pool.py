"""The server's side of the sandbox: a warm fork server, a concurrency cap, a bounded queue.

`SandboxPool.start` launches `freemark_keyserver.forkserver` as a fresh Python (exec, not fork:
it shares no memory with the server) with the clean environment of `worker_environment`, in
its own session, and waits until it has imported torch and probed the isolation layers. The
server starts it before it reads any key (`server.create_server`).

Each run takes one of `workers` slots; up to `queue` more runs wait for one, and past that a
run is refused at once with `SandboxBusy` (RESOURCE_EXHAUSTED with a retry hint). While it
waits or runs, the gRPC call it serves (`cancellation.current`) is checked every `POLL_SECONDS`: when
the caller cancels or the deadline passes, the pool closes the run's status socket, the fork
server kills the child at once, and `cancellation.CallEnded` is raised so nothing is signed or
logged. Inputs travel as descriptors: a spooled upload opened read-only (its group set to the
sandbox user's when that user differs), or a memfd holding a decrypted host
(`hosts.host_file`), so the child never needs a path into the data dir.
"""

from __future__ import annotations

import array
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError, ModelFileError
from freemark.triggers import TriggerSet
from freemark_keyserver import cancellation, metrics, sandbox_isolation
from freemark_keyserver.sandbox_worker import MAX_MESSAGE_CHARS, OK, REFUSED

__all__ = ["POLL_SECONDS", "SandboxPool", "TriggerRun", "default_workers"]

POLL_SECONDS = 0.05  # how often a waiting or running call is checked for cancellation
START_SECONDS = 120.0  # importing torch on a loaded 2-core machine
IDENTITY_BYTES = 64
GiB = 1 << 30


@dataclass(frozen=True)
class TriggerRun:
    """One trigger set to run the model on, at one layer and pooling, followed by `probes`
    alignment probes that the child derives from the triggers (`freemark.probes`)."""

    layer: str
    pooling: int
    triggers: TriggerSet
    probes: int = 0

    @property
    def rows(self) -> int:
        """How many activation rows the run answers: the triggers, then the probes."""
        return len(self.triggers) + self.probes


def default_workers(memory_bytes: int) -> int:
    """min(cores, available memory // per-child address-space limit), at least 1.

    Each child may map up to `memory_bytes` (RLIMIT_AS); the torch pages it shares with the fork
    server count once, so this is conservative. One child per core: a run is single-threaded.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = memory_bytes
    return max(1, min(os.cpu_count() or 1, available // memory_bytes))


def _send_fds(sock: socket.socket, payload: dict[str, Any], fds: Sequence[int]) -> None:
    sock.sendmsg([json.dumps(payload).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _grant(fd: int, user: tuple[int, int] | None) -> None:
    """Let the sandbox user read an input through its descriptor (the data dir stays 0700)."""
    if user is None:
        return
    info = os.fstat(fd)
    if info.st_mode & stat.S_IROTH or info.st_gid == user[1]:
        return  # a memfd (0777) or already granted
    os.fchown(fd, -1, user[1])
    os.fchmod(fd, stat.S_IMODE(info.st_mode) | stat.S_IRGRP
              | (stat.S_IXGRP if stat.S_ISDIR(info.st_mode) else 0))
    if stat.S_ISDIR(info.st_mode):
        for entry in os.scandir(fd):
            child = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                _grant(child, user)
            finally:
                os.close(child)


class SandboxPool:
    """A started fork server and the cap in front of it."""

    def __init__(self, *, workers: int, queue: int, limits: Any) -> None:
        if workers < 1 or queue < 0:
            raise InvalidInputError("the sandbox needs at least one worker and a queue >= 0")
        self.workers = workers
        self.queue = queue
        self.limits = limits
        self.isolation = sandbox_isolation.Isolation({})
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._waiting = 0
        self._mean_run = 1.0
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._home: tempfile.TemporaryDirectory[str] | None = None
        self._user = sandbox_isolation.sandbox_user()

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> SandboxPool:
        from freemark_keyserver.sandbox import worker_environment

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._home = tempfile.TemporaryDirectory(prefix="freemark-sandbox-")
        home = Path(self._home.name)
        if self._user is not None:
            os.chown(home, -1, self._user[1])
            home.chmod(0o750)
        limits = {"memory_bytes": self.limits.memory_bytes,
                  "cpu_seconds": self.limits.cpu_seconds,
                  "open_files": self.limits.open_files, "threads": self.limits.threads}
        self._process = subprocess.Popen(
            [sys.executable, "-s", "-B", "-P", "-m", "freemark_keyserver.forkserver",
             str(theirs.fileno()), str(self.workers), json.dumps(limits)],
            env=worker_environment(self.limits, home), cwd=home, pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._control = ours
        ours.settimeout(START_SECONDS)
        try:
            ready = json.loads(ours.recv(1 << 16) or b"{}")
        except (OSError, ValueError) as exc:
            self.close()
            raise OSError(f"the sandbox fork server did not start: {exc}") from exc
        ours.settimeout(None)
        if not ready.get("ready"):
            self.close()
            raise OSError("the sandbox fork server did not start")
        self.isolation = sandbox_isolation.Isolation(ready["isolation"])
        if not self.isolation.on("limits"):
            self.close()
            raise OSError(f"the sandbox cannot apply its limits: {self.isolation.layers['limits']}")
        sandbox_isolation.harden_parent()
        return self

    def close(self) -> None:
        """Stop the fork server (it kills its children when its control socket closes)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        """{"running", "high_water", "forked", "isolation"} as the fork server counts them."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine:
            with self._lock:
                assert self._control is not None, "the pool is not started"
                _send_fds(self._control, {"op": "stats", "reset": reset}, [theirs.fileno()])
            theirs.close()
            mine.settimeout(30)
            return dict(json.loads(mine.recv(1 << 16)))

    # --- admission ----------------------------------------------------------------------

    def _admit(self) -> None:
        """Take a slot, waiting in the bounded queue; SandboxBusy when the queue is full."""
        from freemark_keyserver.sandbox import SandboxBusy

        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self.queue:
                retry = max(1.0, self._mean_run * (self._waiting + 1) / self.workers)
                raise SandboxBusy(
                    f"all {self.workers} sandbox workers are busy and {self._waiting} runs are "
                    f"queued; retry in about {retry:.0f} s", retry_after=retry)
            self._waiting += 1
            metrics.SANDBOX_QUEUE_DEPTH.set(self._waiting)
        try:
            while not self._slots.acquire(timeout=POLL_SECONDS):
                why = cancellation.ended(cancellation.current())
                if why is not None:
                    raise cancellation.CallEnded(f"the call ended ({why}) while queued for the sandbox")
        finally:
            with self._lock:
                self._waiting -= 1
                metrics.SANDBOX_QUEUE_DEPTH.set(self._waiting)

    # --- one run ------------------------------------------------------------------------

    def run(self, model_path: Path, runs: Sequence[TriggerRun], *, weights_path: Path | None,
            limits: Any, options: dict[str, Any] | None = None
            ) -> tuple[bytes, list[np.ndarray | Exception]]:
        """The model's identity and, per trigger run, its activations or its refusal.

        Raises for the model as a whole (unreadable file, limits, deadline, crash, busy).
        """
        request = _encode(runs, bool(weights_path), options or {})
        self._admit()
        started = time.monotonic()
        metrics.SANDBOX_RUNNING.inc()
        try:
            raw, code = self._exchange(model_path, weights_path, request, limits)
        finally:
            metrics.SANDBOX_RUNNING.dec()
            self._slots.release()
            elapsed = time.monotonic() - started
            self._mean_run = 0.8 * self._mean_run + 0.2 * elapsed
            metrics.SANDBOX_RUN_SECONDS.observe(elapsed)
        return _decode(raw, code, [r.rows for r in runs], limits)

    def _exchange(self, model_path: Path, weights_path: Path | None, request: bytes,
                  limits: Any) -> tuple[bytes, int]:
        from freemark_keyserver.sandbox import SandboxError, SandboxTimeout

        inputs = []
        try:
            for path in (model_path, weights_path):
                if path is not None:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    inputs.append(fd)
                    _grant(fd, self._user if self.isolation.on("user") else None)
        except OSError as exc:
            for fd in inputs:
                os.close(fd)
            raise ModelFileError(f"{Path(path).name}: cannot be opened ({exc.strerror})") from exc
        status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        data, data_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._control is None:
                    raise SandboxError("the sandbox pool is closed")
                _send_fds(self._control, {"op": "run", "limits": _child_limits(limits)},
                          [status_theirs.fileno(), data_theirs.fileno(), *inputs])
        finally:
            for fd in inputs:
                os.close(fd)
            status_theirs.close()
            data_theirs.close()
        with status, data:
            status.settimeout(START_SECONDS)
            first = json.loads(status.recv(1 << 12) or b"{}")
            if first.get("error") == "busy":
                from freemark_keyserver.sandbox import SandboxBusy
                raise SandboxBusy("the sandbox is at its cap; retry shortly", retry_after=1.0)
            if "pid" not in first:
                raise SandboxError("the sandbox fork server did not start the run")
            exchange = _Exchange(data, request, limits.max_output_bytes)
            deadline = time.monotonic() + limits.wall_seconds
            status.settimeout(POLL_SECONDS)
            while True:
                try:
                    message = status.recv(1 << 12)
                    break
                except TimeoutError:
                    pass
                why = cancellation.ended(cancellation.current())
                if why is None and time.monotonic() > deadline:
                    why = "deadline"
                if why is not None:
                    status.close()  # the fork server kills the child now
                    metrics.SANDBOX_KILLS_TOTAL.labels(why).inc()
                    if why == "deadline" and cancellation.ended(cancellation.current()) is None:
                        raise SandboxTimeout(f"the model did not finish within "
                                             f"{limits.wall_seconds:g} s and was killed")
                    raise cancellation.CallEnded(f"the call ended ({why}); its sandbox run was killed")
            code = int(json.loads(message or b'{"exit": -9}')["exit"])
            raw = exchange.finish()
        if exchange.overflow:
            metrics.SANDBOX_KILLS_TOTAL.labels("output").inc()
            raise SandboxError(f"the worker's output exceeds max_output_bytes="
                               f"{limits.max_output_bytes}")
        return raw, code


def _child_limits(limits: Any) -> dict[str, int]:
    fields = asdict(limits)
    return {name: fields[name] for name in ("memory_bytes", "cpu_seconds", "open_files",
                                            "threads")}


class _Exchange:
    """Writes the request and reads the reply on threads, so neither side can block."""

    def __init__(self, sock: socket.socket, request: bytes, cap: int) -> None:
        self.sock = sock
        self.overflow = False
        self._reply = bytearray()
        self._cap = cap
        self._threads = [threading.Thread(target=self._write, args=(request,), daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _write(self, request: bytes) -> None:
        try:
            self.sock.sendall(request)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # the child died or stopped reading; its exit status says why
            pass

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                if len(self._reply) + len(chunk) > self._cap:
                    self.overflow = True
                    return
                self._reply += chunk
        except OSError:
            pass

    def finish(self) -> bytes:
        for thread in self._threads:
            thread.join(5.0)
        return bytes(self._reply)


def _encode(runs: Sequence[TriggerRun], has_weights: bool, options: dict[str, Any]) -> bytes:
    header = {**options, "model": "/proc/self/fd/4",
              "weights": "/proc/self/fd/5" if has_weights else None,
              "sets": [{"layer": r.layer, "pooling": int(r.pooling), "probes": int(r.probes),
                        "has_mask": r.triggers.attention_mask is not None} for r in runs]}
    buffer = io.BytesIO()
    arrays: list[Any] = [np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)]
    for r in runs:
        arrays.append(r.triggers.inputs)
        if r.triggers.attention_mask is not None:
            arrays.append(r.triggers.attention_mask)
    try:
        for item in arrays:
            np.save(buffer, np.asarray(item), allow_pickle=False)
    except ValueError as exc:  # object arrays would need pickle
        raise InvalidInputError(f"trigger arrays must be numeric: {exc}") from exc
    return buffer.getvalue()


def _frame(buffer: io.BytesIO) -> np.ndarray:
    from freemark_keyserver.sandbox import SandboxError

    try:
        array_ = np.load(buffer, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SandboxError("the worker's output is not a .npy array") from exc
    if not isinstance(array_, np.ndarray):
        raise SandboxError("the worker's output is not a .npy array")
    return array_


def _status(buffer: io.BytesIO) -> tuple[str, str]:
    from freemark_keyserver.sandbox import SandboxError

    frame = _frame(buffer)
    try:
        report = json.loads(frame.tobytes())
        return str(report["kind"]), str(report["message"])[:MAX_MESSAGE_CHARS]
    except (ValueError, TypeError, KeyError) as exc:
        raise SandboxError("the worker failed without a readable report") from exc


def _refusal(kind: str, message: str) -> Exception:
    from freemark_keyserver.sandbox import SandboxError, SandboxResourceError

    if kind == "invalid_model":
        return ModelFileError(message)
    if kind == "invalid_input":
        return InvalidInputError(message)
    if kind == "resource":
        return SandboxResourceError(message)
    return SandboxError(f"the worker failed: {message}")


def _decode(raw: bytes, code: int, rows: list[int], limits: Any
            ) -> tuple[bytes, list[np.ndarray | Exception]]:
    import signal

    from freemark_keyserver.sandbox import SandboxError, SandboxResourceError, check_activations

    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        metrics.SANDBOX_KILLS_TOTAL.labels("cpu").inc()
        raise SandboxResourceError(f"the model ran past the CPU-time limit of "
                                   f"{limits.cpu_seconds} s")
    if code < 0:
        metrics.SANDBOX_KILLS_TOTAL.labels("crash").inc()
        raise SandboxError(f"the worker died from signal {signal.Signals(-code).name}; the model "
                           "was refused")
    if code != 0 or not raw:
        metrics.SANDBOX_KILLS_TOTAL.labels("crash").inc()
        raise SandboxError(f"the worker exited with status {code} without a report")
    buffer = io.BytesIO(raw[1:])
    if raw[:1] == REFUSED:
        raise _refusal(*_status(buffer))
    if raw[:1] != OK:
        raise SandboxError("the worker's output has no status")
    identity = _frame(buffer)
    if identity.dtype != np.uint8 or identity.shape != (IDENTITY_BYTES,):
        raise SandboxError("the worker's output does not start with the model's identity")
    results: list[np.ndarray | Exception] = []
    for n_rows in rows:
        kind, message = _status(buffer)
        if kind != "ok":
            results.append(_refusal(kind, message))
            continue
        results.append(check_activations(_frame(buffer), n_rows))
    if buffer.tell() != len(raw) - 1:
        raise SandboxError("the worker's output has trailing bytes")
    return identity.tobytes(), results
