"""The sandbox's warm fork server: torch imported once, one forked child per untrusted model.

`python -m freemark_keyserver.sandbox.forkserver CONTROL_FD WORKERS LIMITS` is started by
`SandboxPool.start` with the environment of `limits.worker_environment` (nothing inherited, so
no FREEMARK_* secret), only its control socket open, in a session of its own, before the
server reads any key. It imports numpy, torch, the export deserializer, safetensors and our
loading code, then serves on the control socket (AF_UNIX SOCK_SEQPACKET; one JSON message
per packet, descriptors attached with SCM_RIGHTS):

- ``{"op": "run", "limits": {...}}`` with [status socket, data socket, input fds...]: fork a
  child that renumbers the data socket to `protocol.DATA_FD` (3) and the inputs to 4, 5, ...,
  closes everything else, enters its isolation layers with the given limits
  (`limits.child_limits`, applied by `limits.limit_self`) and answers on the data socket
  (`worker.serve`). The fork server keeps only the status socket: it sends
  ``{"pid": P}``, then ``{"exit": CODE}`` (negative: killed by that signal) once the child is
  reaped. When the pool shuts its sending side of the status socket (the run is over:
  answered, cancelled, past its deadline) or closes it (the server died), the child is
  killed at once (SIGKILL through its pidfd, so no recycled pid is ever hit). A child counts
  against the cap until it is reaped, and the pool frees its own slot only when it reads
  that ``{"exit"}``: the two caps count the same children at every moment, so a run the
  pool admits is never refused here for a child the pool has already let go (issue 18).
  Past ``max_children`` unreaped children a run is answered ``{"error": "busy"}``: a second
  cap behind the pool's own.
- ``{"op": "stats", "reset": bool}`` with [reply socket]: ``{"running", "high_water",
  "forked", "isolation"}``, measured here, where the children are. ``reset`` restarts the
  high-water mark.

The fork server is single-threaded (fork is safe) and never runs untrusted code itself. At
start it forks one probe child that enters every isolation layer, so it can report what this
machine allows (``{"ready": true, "isolation": {...}}`` is its first message); later children
must enter at least those layers or they stop. It exits, killing every child, when the
control socket closes.

It is the child side of the sandbox: it imports the child side (`worker`, `isolation`) and the
shared modules (`limits`, `protocol`, `errors`, `formats`), never the parent side (`runner`,
`pool`), so the process that forks untrusted models holds none of the server's code.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
from typing import Any

from freemark_keyserver.sandbox import isolation as sandbox_isolation
from freemark_keyserver.sandbox import worker
from freemark_keyserver.sandbox.limits import limit_self
from freemark_keyserver.sandbox.protocol import DATA_FD

MAX_FDS = 8
CONTROL_BYTES = 1 << 16
_EXIT_CHILD_FAILED = 70


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    message, ancillary, _flags, _addr = sock.recvmsg(CONTROL_BYTES,
                                                      socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not message:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(message), list(fds)


def _send(sock: socket.socket, payload: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(payload).encode())
    except OSError:  # the pool gave up on this run; nothing to tell
        pass


def _child(data_fd: int, inputs: list[int], limits: dict[str, int],
           required: sandbox_isolation.Isolation | None) -> int:
    """In the forked child: tidy descriptors, enter the layers, answer the request."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    wanted = [data_fd, *inputs]
    staged = [os.dup(fd) for fd in wanted]  # above every target number, so dup2 clobbers nothing
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for number, fd in enumerate(staged, start=DATA_FD):
        os.dup2(fd, number, inheritable=False)
    os.closerange(DATA_FD + len(staged), os.sysconf("SC_OPEN_MAX"))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sandbox_isolation.enter(lambda: limit_self(**limits), required=required)
    return worker.serve(DATA_FD)


def _fork_child(data_fd: int, inputs: list[int], limits: dict[str, int],
                required: sandbox_isolation.Isolation | None) -> int:
    pid = os.fork()
    if pid == 0:
        code = _EXIT_CHILD_FAILED
        try:
            code = _child(data_fd, inputs, limits, required)
        finally:
            os._exit(code)
    return pid


def _probe(limits: dict[str, int]) -> sandbox_isolation.Isolation:
    """Enter every layer in a throwaway child and read back which held."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            mine.close()
            state = sandbox_isolation.enter(lambda: limit_self(**limits), required=None)
            os.write(theirs.fileno(), json.dumps(state.layers).encode())  # write: allowed
        finally:
            os._exit(0)
    theirs.close()
    try:
        layers = json.loads(mine.recv(CONTROL_BYTES) or b"{}")
    finally:
        mine.close()
        os.waitpid(pid, 0)
    return sandbox_isolation.Isolation(
        {name: layers.get(name, "unavailable (the probe child died)")
         for name in sandbox_isolation.LAYERS})


class ForkServer:
    """The loop: control messages, status sockets of live children, their pidfds."""

    def __init__(self, control: socket.socket, max_children: int,
                 isolation: sandbox_isolation.Isolation) -> None:
        self.control = control
        self.max_children = max_children
        self.isolation = isolation
        self.selector = selectors.DefaultSelector()
        # Every child not yet reaped, killed or not: the cap counts these.
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pid -> (pidfd, status)
        self.high_water = 0
        self.forked = 0
        self.selector.register(control, selectors.EVENT_READ, ("control", None))

    def loop(self) -> None:
        while True:
            for key, _ in self.selector.select():
                kind, pid = key.data
                if kind == "control":
                    if not self._control():
                        return
                elif kind == "status":
                    # The pool is done with the run, or (never) wrote to it. An event for a
                    # child reaped earlier in this batch is stale: its socket is closed.
                    if pid in self.children and self.children[pid][1] is key.fileobj:
                        self._kill(pid)
                elif kind == "exit":
                    self._reap(pid)

    def _control(self) -> bool:
        message, fds = _recv(self.control)
        if message is None:
            return False
        if message.get("op") == "stats" and fds:
            reply = socket.socket(fileno=fds[0])
            _send(reply, {"running": len(self.children), "high_water": self.high_water,
                          "forked": self.forked, "isolation": self.isolation.layers})
            reply.close()
            if message.get("reset"):
                self.high_water = len(self.children)
            for fd in fds[1:]:
                os.close(fd)
            return True
        if message.get("op") != "run" or len(fds) < 2:
            for fd in fds:
                os.close(fd)
            return True
        status = socket.socket(fileno=fds[0])
        try:
            if len(self.children) >= self.max_children:
                _send(status, {"error": "busy"})
                status.close()
                return True
            pid = _fork_child(fds[1], fds[2:], message["limits"], self.isolation)
        finally:
            for fd in fds[1:]:
                os.close(fd)
        self.forked += 1
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (pidfd, status)
        self.high_water = max(self.high_water, len(self.children))
        self.selector.register(status, selectors.EVENT_READ, ("status", pid))
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        _send(status, {"pid": pid})
        return True

    def _kill(self, pid: int) -> None:
        """SIGKILL a child; its status socket stays open for the ``{"exit"}`` the pool waits
        for, sent once the child is reaped."""
        pidfd, status = self.children[pid]
        self.selector.unregister(status)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:  # it had exited already; reaping follows
            pass

    def _reap(self, pid: int) -> None:
        pidfd, status = self.children.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        try:
            self.selector.unregister(status)
        except KeyError:  # killed: `_kill` stopped watching it
            pass
        _send(status, {"exit": code})  # the pool's slot is free from here
        status.close()

    def shutdown(self) -> None:
        for pidfd, _ in self.children.values():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            os.waitpid(pid, 0)


def _warm_up(home: str) -> None:
    """Load, vet and run a tiny program once, so every module a run imports lazily is imported
    here: a child that dropped to another user may not read the interpreter's own library."""
    import encodings.cp437
    import encodings.latin_1
    import encodings.utf_16  # noqa: F401

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from freemark.formats.pt2 import apply_weights, load_program, save_program, state_dict_of
    from freemark.formats.pt2_vetting import vet_program
    from freemark.scheme.activations import capture
    from freemark.scheme.triggers import TriggerSet
    from freemark.v1 import bundle_pb2

    torch.set_num_threads(1)
    from freemark_keyserver.sandbox import formats

    formats.warm_up(home)  # transformers, onnx and onnxruntime import lazily: do it here

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3))
    program_path, weights_path = os.path.join(home, "warm.pt2"), os.path.join(home, "warm.st")
    save_program(model, (torch.zeros(2, 1, 6, 6),), program_path)
    try:
        program = load_program(program_path)
        vet_program(program)
        save_file({k: v.contiguous() for k, v in state_dict_of(program).items()}, weights_path)
        triggers = TriggerSet(inputs=np.zeros((2, 1, 6, 6), dtype=np.float32))
        for target in (program, apply_weights(program, weights_path)):
            for layer, pooling in (("1", bundle_pb2.POOLING_SPATIAL_MEAN),
                                   ("3", bundle_pb2.POOLING_NONE)):
                capture(target, layer, triggers, pooling=pooling)
    finally:
        for path in (program_path, weights_path):
            if os.path.exists(path):
                os.unlink(path)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[1]))
    max_children = int(argv[2])
    limits = json.loads(argv[3])
    tempfile.tempdir = os.getcwd()
    import warnings

    warnings.simplefilter("ignore")
    _warm_up(os.getcwd())
    isolation = _probe(limits)
    control.send(json.dumps({"ready": True, "isolation": isolation.layers}).encode())
    server = ForkServer(control, max_children, isolation)
    try:
        server.loop()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
