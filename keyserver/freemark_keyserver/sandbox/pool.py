"""The server's side of the sandbox: a warm fork server, a concurrency cap, a bounded queue.

`SandboxPool.start` launches `freemark_keyserver.sandbox.forkserver` as a fresh Python (exec,
not fork: it shares no memory with the server) with the clean environment of
`limits.worker_environment`, in its own session, and waits until it has imported torch and probed the isolation layers. The
server starts it before it reads any key (`server.create_server`).

A run is a conversation with one child (`_Child`, one thread, no helper threads): framed
requests out, framed replies back (`protocol`), with a follow-up request when the
caller asks for one (`run(then=...)`: Register's prior-claim sets, read by the child that
read the host). Shutting the run's status socket ends it: the fork server kills the child,
reaps it and answers ``{"exit": CODE}``.

Each run takes one of `workers` slots; up to `queue` more runs wait for one, and past that a
run is refused at once with `SandboxBusy` (RESOURCE_EXHAUSTED with a retry hint). A slot is
let go when the fork server says the run's child is reaped (`_Child.end`), not when the
reply is in: the fork server counts a child until it is reaped, so both caps agree and a run
admitted below the cap is never refused by the second one (issue 18). While it
waits or runs, the gRPC call it serves (`cancellation.current`) is checked every `POLL_SECONDS`: when
the caller cancels or the deadline passes, the pool shuts the run's status socket, the fork
server kills the child at once, and `cancellation.CallEnded` is raised so nothing is signed or
logged. Inputs travel as descriptors opened read-only: the sealed memfd of an upload
(`rpc.uploads`) or of a decrypted host (`hosts.host_file`); any other file gets its group
set to the sandbox user's when that user differs (`_grant`), so the child never needs a path
into the data dir.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError, ModelFileError
from freemark_keyserver import cancellation, metrics
from freemark_keyserver.sandbox import isolation as sandbox_isolation
from freemark_keyserver.sandbox.errors import (
    SandboxBusy,
    SandboxError,
    SandboxResourceError,
    SandboxTimeout,
    SandboxUnavailable,
)
from freemark_keyserver.sandbox.limits import SandboxLimits, child_limits, worker_environment
from freemark_keyserver.sandbox.protocol import (
    LENGTH,
    ModelIdentity,
    TriggerRun,
    decode_reply,
    encode_request,
)

__all__ = ["POLL_SECONDS", "SandboxPool", "Then", "default_workers"]

log = logging.getLogger("freemark_keyserver")

POLL_SECONDS = 0.05  # how often a waiting or running call is checked for cancellation
START_SECONDS = 120.0  # importing torch on a loaded 2-core machine
# How long a run's end waits for the fork server to reap its SIGKILLed child (milliseconds,
# normally). Past it the slot is let go anyway: the fork server still counts the child, so
# a run admitted meanwhile may be refused SANDBOX_BUSY, which is then the truth.
REAP_SECONDS = 10.0


def default_workers(limits: SandboxLimits) -> int:
    """min(cores, available memory // what one worker may cost), at least 1.

    One worker costs its child's address-space limit (`memory_bytes`, RLIMIT_AS; the torch
    pages it shares with the fork server count once, so this is conservative) and, in the
    server, the replies it sends back while they are decoded and judged
    (`SandboxLimits.reply_bytes`). One child per core: a run is single-threaded.
    """
    per_worker = limits.memory_bytes + limits.reply_bytes
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = per_worker
    return max(1, min(os.cpu_count() or 1, available // per_worker))


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

    def __init__(self, *, workers: int, queue: int, limits: SandboxLimits) -> None:
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
        self._closing = False
        self.restarts = 0
        # Told True/False when the fork server dies and when it is back (the server's health).
        self.on_state: Callable[[bool], None] = lambda alive: None

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> SandboxPool:
        """Launch the fork server and a thread that relaunches it should it ever die."""
        self._home = tempfile.TemporaryDirectory(prefix="freemark-sandbox-")
        home = Path(self._home.name)
        if self._user is not None:
            os.chown(home, -1, self._user[1])
            home.chmod(0o750)
        try:
            self.isolation = self._launch()
        except OSError:
            self.close()
            raise
        if not self.isolation.on("limits"):
            self.close()
            raise OSError(f"the sandbox cannot apply its limits: {self.isolation.layers['limits']}")
        sandbox_isolation.harden_parent()
        threading.Thread(target=self._keep_alive, name="sandbox-keep-alive", daemon=True).start()
        return self

    def _launch(self) -> sandbox_isolation.Isolation:
        """Start a fork server (a fresh interpreter: it inherits no memory, no descriptor but
        its control socket, no environment; so a relaunch after the keys are loaded is as
        clean as the first) and wait until it is ready; its isolation report."""
        assert self._home is not None
        home = Path(self._home.name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        limits = child_limits(self.limits)  # for the start-up probe child
        process = subprocess.Popen(
            [sys.executable, "-s", "-B", "-P", "-m", "freemark_keyserver.sandbox.forkserver",
             str(theirs.fileno()), str(self.workers), json.dumps(limits)],
            env=worker_environment(self.limits, home), cwd=home, pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._control, self._process = ours, process
        ours.settimeout(START_SECONDS)
        try:
            ready = json.loads(ours.recv(1 << 16) or b"{}")
        except (OSError, ValueError) as exc:
            raise OSError(f"the sandbox fork server did not start: {exc}") from exc
        ours.settimeout(None)
        if not ready.get("ready"):
            raise OSError("the sandbox fork server did not start")
        return sandbox_isolation.Isolation(ready["isolation"])

    def _keep_alive(self) -> None:
        """Relaunch the fork server whenever it dies while the pool is open (killed by the
        OOM killer, say): runs it had are answered SANDBOX_UNAVAILABLE, later ones wait for
        the relaunch. A relaunch that enters fewer isolation layers than the first is not
        used: the pool stays down rather than run models with less isolation than reported."""
        while (process := self._process) is not None:
            code = process.wait()
            with self._lock:
                if self._closing or process is not self._process:
                    return
                log.error("the sandbox fork server exited (status %s); relaunching it", code)
                metrics.SANDBOX_RESTARTS_TOTAL.inc()
                self.on_state(False)
                if self._control is not None:
                    self._control.close()
                self._control, self._process = None, None
                try:
                    isolation = self._launch()
                except OSError as exc:
                    log.error("the sandbox fork server could not be relaunched: %s", exc)
                    isolation = None
                lost = [layer for layer in sandbox_isolation.LAYERS if self.isolation.on(layer)
                        and (isolation is None or not isolation.on(layer))]
                if isolation is None or lost:
                    log.error("the sandbox stays down: the relaunched fork server lacks %s",
                              ", ".join(lost) or "a working start")
                    self._stop_process()
                    return
                self.restarts += 1
                log.info("the sandbox fork server is back (isolation: %s)", isolation.summary())
                self.on_state(True)

    @property
    def alive(self) -> bool:
        """Whether a fork server is up to take runs."""
        process = self._process
        return process is not None and process.poll() is None

    def close(self) -> None:
        """Stop the fork server (it kills its children when its control socket closes)."""
        with self._lock:
            self._closing = True
            self._stop_process()
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def _stop_process(self) -> None:
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

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        """{"running", "high_water", "forked", "isolation"} as the fork server counts them."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine:
            with self._lock:
                if self._control is None:
                    raise SandboxUnavailable("the sandbox is down")
                _send_fds(self._control, {"op": "stats", "reset": reset}, [theirs.fileno()])
            theirs.close()
            mine.settimeout(30)
            return dict(json.loads(mine.recv(1 << 16)))

    # --- admission ----------------------------------------------------------------------

    def _admit(self) -> None:
        """Take a slot, waiting in the bounded queue; SandboxBusy when the queue is full."""
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
                    raise cancellation.CallEnded(why, "while queued for the sandbox")
        finally:
            with self._lock:
                self._waiting -= 1
                metrics.SANDBOX_QUEUE_DEPTH.set(self._waiting)

    # --- one run ------------------------------------------------------------------------

    def run(self, model_path: Path, runs: Sequence[TriggerRun], *, weights_path: Path | None,
            limits: SandboxLimits, options: dict[str, Any] | None = None,
            then: Then | None = None
            ) -> tuple[ModelIdentity, list[np.ndarray | Exception]]:
        """The model's identity and, per trigger run, its activations or its refusal.

        Raises for the model as a whole (unreadable file, limits, deadline, crash, busy).
        `then(identity, results)`, when given, is called with that answer while the child
        still holds the model, and returns more runs for the same load (Register's prior-claim
        sets: the claim index's scans, then the candidates'); their results follow the first
        ones, and `then` is asked again with all of them until it returns no run. A failure of the child while it reads them (a crash, its limits, the deadline)
        becomes each one's result, as a run that fails alone; the call's end still raises.
        """
        request = encode_request(runs, bool(weights_path), options or {})
        self._admit()
        started = time.monotonic()
        metrics.SANDBOX_RUNNING.inc()
        try:
            with self._child(model_path, weights_path, limits) as child:
                identity, results = decode_reply(child.ask(request), [r.rows for r in runs],
                                                 [r.scans for r in runs], [r.outputs for r in runs])
                while then is not None and (more := list(then(identity, results))):
                    results = [*results, *_more(child, more, bool(weights_path), options or {})]
        finally:
            metrics.SANDBOX_RUNNING.dec()
            self._slots.release()
            elapsed = time.monotonic() - started
            self._mean_run = 0.8 * self._mean_run + 0.2 * elapsed
            metrics.SANDBOX_RUN_SECONDS.observe(elapsed)
        return identity, results

    @contextlib.contextmanager
    def _child(self, model_path: Path, weights_path: Path | None, limits: SandboxLimits
               ) -> Iterator[_Child]:
        """A forked child holding read-only descriptors of the inputs; killed on exit."""
        inputs = []
        try:
            for path in (p for p in (model_path, weights_path) if p is not None):
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
                    raise SandboxUnavailable("the sandbox is down; the operator has been "
                                             "alerted: retry later")
                try:
                    _send_fds(self._control, {"op": "run", "limits": child_limits(limits)},
                              [status_theirs.fileno(), data_theirs.fileno(), *inputs])
                except OSError as exc:  # it died; `_keep_alive` is relaunching it
                    raise SandboxUnavailable("the sandbox is restarting: retry shortly") from exc
        finally:
            for fd in inputs:
                os.close(fd)
            status_theirs.close()
            data_theirs.close()
        with status, data:
            status.settimeout(START_SECONDS)
            first = json.loads(status.recv(1 << 12) or b'{"error": "gone"}')
            if first.get("error") == "gone":
                raise SandboxUnavailable("the sandbox is restarting: retry shortly")
            if first.get("error") == "busy":
                raise SandboxBusy("the sandbox is at its cap; retry shortly", retry_after=1.0)
            if "pid" not in first:
                raise SandboxError("the sandbox fork server did not start the run")
            child = _Child(status, data, limits)
            try:
                yield child
            finally:
                child.end()  # killed and reaped: the run's slot is free for both caps


Then = Callable[[ModelIdentity, list[np.ndarray | Exception]], Sequence[TriggerRun]]


def _more(child: _Child, runs: Sequence[TriggerRun], has_weights: bool,
          options: dict[str, Any]) -> list[np.ndarray | Exception]:
    """The results of a follow-up request; the child's failure becomes each run's result."""
    try:
        _, results = decode_reply(child.ask(encode_request(runs, has_weights, options)),
                                  [r.rows for r in runs], [r.scans for r in runs],
                                  [r.outputs for r in runs])
    except cancellation.CallEnded:
        raise
    except Exception as exc:  # noqa: BLE001 - every run of the batch fails alone, with this
        return [exc] * len(runs)
    return results


class _Reply:
    """One framed reply as it arrives: its 8-byte length, then its body, received in place
    into one buffer of exactly the announced size, allocated only once that size is
    accepted (`_Child._receive`). Nothing is copied on the way: `decode_reply` reads the
    frames where they lie."""

    def __init__(self) -> None:
        self._length = bytearray(LENGTH.size)
        self.body: bytearray | None = None
        self._got = 0

    def space(self) -> memoryview:
        """Where the next bytes go."""
        target = self._length if self.body is None else self.body
        return memoryview(target)[self._got:]

    def advance(self, count: int) -> int | None:
        """`count` more bytes are in; the announced size once the length is complete."""
        self._got += count
        if self.body is None and self._got == LENGTH.size:
            return int(LENGTH.unpack(self._length)[0])
        return None

    def allocate(self, size: int) -> None:
        self.body, self._got = bytearray(size), 0

    @property
    def complete(self) -> bool:
        return self.body is not None and self._got == len(self.body)


class _Child:
    """The conversation with one forked child: a request out, its framed reply back, on one
    thread, watching the call, the wall-clock deadline and the child's exit all the while."""

    def __init__(self, status: socket.socket, data: socket.socket, limits: SandboxLimits
                 ) -> None:
        self._status, self._data, self._limits = status, data, limits
        self._deadline = 0.0  # set by each request
        self._code: int | None = None  # the child's exit status, once the fork server says it
        self._eof = False
        # What may still be read back from this child, all its replies together: so a
        # Register's follow-up scans and the host's reading they are judged beside stay
        # within one `max_output_bytes`, as a Verify's one reply does.
        self._budget = limits.max_output_bytes
        status.setblocking(False)
        data.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(status, selectors.EVENT_READ)

    def ask(self, request: bytes) -> bytearray:
        """Send one request and return its reply; raise when the call ends, the deadline
        passes, the replies are over `max_output_bytes`, or the child exits without replying."""
        pending = memoryview(LENGTH.pack(len(request)) + request)
        reply = _Reply()
        self._deadline = time.monotonic() + self._limits.wall_seconds  # per request
        self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE)
        while not reply.complete:
            if self._code is not None:  # gone: what it wrote before it died is all there is
                while not self._eof and not reply.complete:
                    self._receive(reply)
                if reply.complete:
                    break
                raise _failure(self._code, self._limits)
            for key, events in self._selector.select(POLL_SECONDS):
                if key.fileobj is self._status:
                    self._exited()
                    continue
                if events & selectors.EVENT_WRITE:
                    pending = self._send(pending)
                if events & selectors.EVENT_READ and not reply.complete:
                    self._receive(reply)
            self._check_call()
        if self._more_than(reply):
            raise self._kill("output", SandboxError("the worker's output has trailing bytes"))
        assert reply.body is not None
        return reply.body

    def _watch(self, events: int) -> None:
        if self._eof:
            return
        try:
            self._selector.modify(self._data, events)
        except KeyError:
            self._selector.register(self._data, events)

    def _more_than(self, reply: _Reply) -> bool:
        """Whether the child sent more than the reply it announced (nothing was asked)."""
        if self._eof:
            return False
        try:
            return bool(self._data.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (BlockingIOError), or the child is gone
            return False

    def _send(self, pending: memoryview) -> memoryview:
        try:
            pending = pending[self._data.send(pending[:1 << 20]):]
        except BlockingIOError:
            return pending
        except OSError:  # the child died or stopped reading; its exit status says why
            pending = pending[:0]
        if not pending:
            self._watch(selectors.EVENT_READ)
        return pending

    def _receive(self, reply: _Reply) -> None:
        try:
            got = self._data.recv_into(reply.space())
        except BlockingIOError:
            if self._code is not None:  # nothing more will come from a child that is gone
                self._eof = True
            return
        except OSError:
            got = 0
        if not got:
            self._eof = True
            self._selector.unregister(self._data)
            return
        size = reply.advance(got)
        if size is not None:  # the length is in: refuse an overflow before allocating for it
            if size > self._budget:
                raise self._kill("output", SandboxError(
                    "the worker's output exceeds "
                    f"max_output_bytes={self._limits.max_output_bytes}"))
            self._budget -= size
            reply.allocate(size)

    def _exited(self) -> None:
        try:
            message = self._status.recv(1 << 12)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        self._selector.unregister(self._status)
        if not message:  # the fork server itself is gone, and the child with it
            raise SandboxUnavailable("the sandbox restarted during this run; nothing was "
                                     "decided: retry")
        self._code = int(json.loads(message)["exit"])

    def _check_call(self) -> None:
        why = cancellation.ended(cancellation.current())
        if why is None and time.monotonic() > self._deadline:
            raise self._kill("deadline", SandboxTimeout(
                f"the model did not finish within {self._limits.wall_seconds:g} s and was "
                "killed"))
        if why is not None:
            raise self._kill(why, cancellation.CallEnded(why, "and its sandbox run was killed"))

    def _kill(self, why: str, error: Exception) -> Exception:
        self._stop()
        metrics.SANDBOX_KILLS_TOTAL.labels(why).inc()
        return error

    def _stop(self) -> None:
        """Tell the fork server the run is over: it kills the child now."""
        try:
            self._status.shutdown(socket.SHUT_WR)
        except OSError:  # the fork server is gone, and the child with it
            pass

    def end(self) -> None:
        """End the run: the child killed and reaped, as the fork server's ``{"exit"}`` says
        (or its end of the socket closing: it is gone, and its children with it). Until then
        the child still counts against the fork server's cap, so the pool's slot is held."""
        self._selector.close()
        if self._code is not None:  # it exited on its own and was reaped
            return
        self._data.close()
        self._stop()
        self._status.settimeout(REAP_SECONDS)
        try:
            self._status.recv(1 << 12)
        except TimeoutError:
            log.error("the sandbox fork server did not reap a killed child within %g s",
                      REAP_SECONDS)
        except OSError:
            pass


def _failure(code: int, limits: SandboxLimits) -> SandboxError:
    """Why a child that exited (status `code`) before its reply was complete gave none."""
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        metrics.SANDBOX_KILLS_TOTAL.labels("cpu").inc()
        return SandboxResourceError(f"the model ran past the CPU-time limit of "
                                    f"{limits.cpu_seconds} s")
    metrics.SANDBOX_KILLS_TOTAL.labels("crash").inc()
    if code < 0:
        return SandboxError(f"the worker died from signal {signal.Signals(-code).name}; the "
                            "model was refused")
    return SandboxError(f"the worker exited with status {code} without a report")
