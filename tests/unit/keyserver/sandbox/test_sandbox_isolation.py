"""The sandbox child's isolation layers, proven from inside a process that entered them.

A model that corrupts memory runs whatever code it likes with the child's rights; these tests
play that code. A fresh interpreter with the worker's environment enters the layers exactly as
a forked child does (`sandbox_isolation.enter` with the default limits), then tries each
escape and reports what happened. Each assertion holds for the layers this machine allows
(the pool's start-up probe says which); a layer it does not allow is skipped by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from freemark_keyserver.sandbox.isolation import LAYERS
from freemark_keyserver.sandbox.limits import SandboxLimits, worker_environment
from freemark_keyserver.sandbox.runner import shared_pool

# What every sandbox child runs first: the layers, with the default limits.
ENTER = textwrap.dedent("""
    import ctypes, json, os, resource, signal, socket, sys
    from freemark_keyserver.sandbox import isolation as sandbox_isolation
    from freemark_keyserver.sandbox import limits as sandbox_limits
    state = sandbox_isolation.enter(
        lambda: sandbox_limits.limit_self(memory_bytes=4 << 30, cpu_seconds=60, open_files=64,
                                          threads=1), required=None)
""")
# A sibling child: inside the layers too (the same user), waiting for its stdin to close.
SIBLING = ENTER + "os.read(0, 1)\n"
ESCAPES = ENTER + textwrap.dedent("""
    secret, proc_environ, scratch, sibling = sys.argv[1:5]
    libc = ctypes.CDLL(None, use_errno=True)
    TGKILL = 234  # x86_64
    def attempt(action):
        try:
            action()
            return "allowed"
        except Exception as exc:  # what stopped it is the answer
            return type(exc).__name__
    def read_secret():
        with open(secret, "rb") as handle:
            handle.read()
    def read_environ():
        with open(proc_environ, "rb") as handle:
            handle.read()
    def tcp():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection:
            connection.connect(("127.0.0.1", 9))
    def write_file():
        with open(os.path.join(scratch, "escape"), "wb") as handle:
            handle.write(b"x")
    def mkdir():
        os.mkdir(os.path.join(scratch, "escape-dir"))
    def fork():
        if os.fork() == 0:
            os._exit(0)
    def tgkill(pid, sig):
        if libc.syscall(TGKILL, pid, pid, sig) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    def starve_sibling():
        resource.prlimit(int(sibling), resource.RLIMIT_CPU, (1, 1))
    def kill_sibling():
        tgkill(int(sibling), signal.SIGKILL)
    def own_limits():  # what the interpreter and glibc do for themselves must still work
        resource.prlimit(0, resource.RLIMIT_NOFILE)
        resource.prlimit(os.getpid(), resource.RLIMIT_NOFILE)
        resource.getrlimit(resource.RLIMIT_AS)
    results = {"layers": state.layers, "secret": attempt(read_secret),
               "environ": attempt(read_environ), "socket": attempt(socket.socket),
               "tcp": attempt(tcp), "write": attempt(write_file), "mkdir": attempt(mkdir),
               "fork": attempt(fork), "starve sibling": attempt(starve_sibling),
               "kill sibling": attempt(kill_sibling), "own limits": attempt(own_limits),
               "signal itself": attempt(lambda: tgkill(os.getpid(), 0))}
    os.write(1, json.dumps(results).encode())
""")


@pytest.fixture(scope="module")
def escapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What a process inside the layers could do: the data dir's key, the server's environ,
    a socket, a connection, a file, a directory, a child, a sibling child (lower its limits,
    kill it). Beside the report: whether the sibling is still alive afterwards, and its
    CPU-time limit as the kernel reports it."""
    folder = tmp_path_factory.mktemp("isolation")
    data_dir = folder / "data"
    data_dir.mkdir(mode=0o700)
    secret = data_dir / "master.key"
    secret.write_bytes(b"1:" + os.urandom(32))
    secret.chmod(0o600)
    scratch = Path("/tmp") if os.access("/tmp", os.W_OK) else folder  # world-writable: the test
    home = folder / "home"
    home.mkdir()
    environment = worker_environment(SandboxLimits(), home)
    sibling = subprocess.Popen([sys.executable, "-s", "-B", "-c", SIBLING], env=environment,
                               cwd=home, stdin=subprocess.PIPE)
    try:
        result = subprocess.run(
            [sys.executable, "-s", "-B", "-c", ESCAPES, str(secret),
             f"/proc/{os.getpid()}/environ", str(scratch), str(sibling.pid)],
            env=environment, cwd=home, capture_output=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
        report = json.loads(result.stdout)
        assert isinstance(report, dict)
        report["sibling alive"] = sibling.poll() is None
        report["sibling cpu limit"] = _cpu_limit(sibling.pid) if report["sibling alive"] else None
    finally:
        sibling.kill()
        sibling.wait()
    return report


def _cpu_limit(pid: int) -> int:
    """A process's soft CPU-time limit in seconds, as /proc says (no capability needed)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max cpu time"):
            return int(line.split()[3])
    raise AssertionError(f"/proc/{pid}/limits names no CPU-time limit")


def _need(report: dict[str, object], *layers: str) -> None:
    states = report["layers"]
    assert isinstance(states, dict)
    missing = [f"{name}: {states[name]}" for name in layers if states[name] != "on"]
    if missing:
        pytest.skip("this machine does not allow " + "; ".join(missing))


def test_every_layer_is_reported_on_or_why_not() -> None:
    layers = shared_pool().isolation.layers
    assert tuple(layers) == LAYERS
    assert all(state == "on" or state.startswith("unavailable (") for state in layers.values())
    assert layers["limits"] == "on"
    if os.geteuid() == 0:
        assert layers["user"] == "on"


def test_the_child_cannot_read_the_data_dir_or_the_servers_proc(
        escapes: dict[str, object]) -> None:
    _need(escapes, "user")
    assert escapes["secret"] == "PermissionError"
    assert escapes["environ"] == "PermissionError"


def test_the_child_cannot_open_a_socket_or_reach_the_network(escapes: dict[str, object]) -> None:
    _need(escapes, "seccomp")
    assert escapes["socket"] == "PermissionError"
    assert escapes["tcp"] == "PermissionError"


def test_the_child_cannot_write_a_file_make_a_directory_or_fork(
        escapes: dict[str, object]) -> None:
    _need(escapes, "seccomp", "limits")
    assert escapes["write"] == "PermissionError"
    assert escapes["mkdir"] == "PermissionError"
    assert escapes["fork"] in ("PermissionError", "BlockingIOError")
    assert not Path("/tmp/escape-dir").exists()


def test_a_child_cannot_starve_or_kill_a_sibling(escapes: dict[str, object]) -> None:
    """Issue 18, item 8: every child runs as the same user, so the kernel alone would let one
    lower another's limits or signal it. The seccomp filter lets `prlimit64` name only the
    child itself (pid 0 or its own) and `tgkill` only its own thread group; the child's own
    uses of both still work."""
    _need(escapes, "seccomp", "limits")
    assert escapes["starve sibling"] == "PermissionError"
    assert escapes["kill sibling"] == "PermissionError"
    assert escapes["own limits"] == "allowed"
    assert escapes["signal itself"] == "allowed"
    assert escapes["sibling alive"] is True
    assert escapes["sibling cpu limit"] == 60  # as it set it, not the 1 s the attacker asked
