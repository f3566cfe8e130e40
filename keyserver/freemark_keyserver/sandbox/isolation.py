"""The isolation layers a sandbox child enters after its fork, and what this machine allows.

Each child of the fork server (`freemark_keyserver.sandbox.forkserver`) calls `enter` between its fork
and its first look at the untrusted model. The layers, in the order they are entered, and what
each one stops once the model's code runs with the child's rights (say an operator corrupts
memory and takes over the process):

network   a new, empty network namespace (`unshare(CLONE_NEWNET)`): no interface but a down
          loopback, so no TCP or UDP anywhere, even if a socket could be made. Needs
          CAP_SYS_ADMIN (root in the container) or unprivileged user namespaces.
user      when the server runs as root: setgroups([]) and setresgid/setresuid to `nobody`, so
          the child cannot read the data dir (0700), `master.key`, `signing.pem`, the spool,
          or the server's /proc entries (environ, mem, fd), and cannot signal the server.
          Without root the child keeps the server's user and this layer is reported off;
          `harden_parent` then makes the server's /proc entries unreadable (not dumpable).
private   PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE 0: no setuid binary gives rights back,
          and sibling children (same user) cannot read one another's memory or descriptors
          through /proc (they run other owners' secret triggers). PR_SET_PDEATHSIG: a child
          dies with its fork server, so none outlives a relaunch.
limits    rlimits (`limits.limit_self`): address space, CPU seconds, open files,
          RLIMIT_FSIZE=0 (no file data written), RLIMIT_NPROC=0 (no fork, no threads).
seccomp   a BPF allow-list of the ~60 system calls loading and running a model needs
          (measured with strace on the digits CNN and EfficientNet-class programs): no
          socket, connect, execve, fork/clone, ptrace, mount, kill, mkdir, unlink, rename,
          chmod, memfd_create; open/openat only without
          O_WRONLY/O_RDWR/O_CREAT/O_TRUNC/O_APPEND (EACCES); prlimit64 and
          sched_getaffinity only on the child itself, tgkill (for abort) only in its own
          thread group, so a child cannot starve or kill a sibling of the same user.
          Anything else fails with EPERM. x86_64 only (the table is that architecture's);
          other machines report it off.
filesystem  the sum of the above: read-only opens, FSIZE=0 and no directory calls, so the
          child can write nothing; it reads its inputs through descriptors it was handed.

The fork server tries every layer in a throwaway child at start-up (`forkserver._probe`) and
reports which hold; the pool keeps the report (`SandboxPool.isolation`), `serve` prints it
and health publishes it. `harden_parent` is the one part that runs in the server itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import pwd
import signal
import struct
from dataclasses import dataclass

__all__ = ["LAYERS", "Isolation", "enter", "harden_parent", "sandbox_user"]

LAYERS = ("network", "user", "private", "limits", "seccomp")

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_EXIT_ORPHANED = 71

# x86_64 numbers (asm/unistd_64.h). Only what a forked, torch-warm child needs to read a
# program from a descriptor, run it single-threaded and write the answer to its socket.
_ALLOWED_X86_64 = {
    "read": 0, "write": 1, "close": 3, "fstat": 5, "lseek": 8, "mmap": 9, "mprotect": 10,
    "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15,
    "ioctl": 16, "pread64": 17, "access": 21, "sched_yield": 24, "mremap": 25, "madvise": 28,
    "dup": 32, "dup2": 33, "nanosleep": 35, "getpid": 39, "exit": 60, "uname": 63, "fcntl": 72,
    "getcwd": 79, "readlink": 89, "gettimeofday": 96, "getrlimit": 97, "sysinfo": 99,
    "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108, "getppid": 110,
    "getresuid": 118, "getresgid": 120, "sigaltstack": 131, "arch_prctl": 158, "gettid": 186,
    "futex": 202, "getdents64": 217, "set_tid_address": 218,
    "restart_syscall": 219, "fadvise64": 221, "clock_gettime": 228, "clock_getres": 229,
    "clock_nanosleep": 230, "exit_group": 231, "mbind": 237,
    "get_mempolicy": 239, "newfstatat": 262, "readlinkat": 267, "faccessat": 269,
    "pselect6": 270, "ppoll": 271, "set_robust_list": 273, "dup3": 292,
    "getrandom": 318, "membarrier": 324, "statx": 332, "rseq": 334, "faccessat2": 439,
    "poll": 7, "select": 23,
}
_OPEN, _OPENAT = 2, 257  # allowed read-only: their flags are checked
# Calls whose first argument names a process: allowed on the child itself only. Every child
# runs as the same user, so the kernel alone would let one lower a sibling's limits (starve
# it) or signal it. prlimit64 and sched_getaffinity: pid 0 or the child's own; tgkill (what
# abort() and raise() use): the child's own thread group.
_SELF_OR_ZERO = (302, 204)  # prlimit64, sched_getaffinity
_SELF = (234,)  # tgkill
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# classic BPF over `struct seccomp_data` {int nr; u32 arch; u64 ip; u64 args[6]}
_NR, _ARCH = 0, 4
_X32_SYSCALL_BIT = 0x40000000
_LD_W_ABS = 0x20
_JEQ_K, _JGE_K, _JSET_K = 0x15, 0x35, 0x45
_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000


def sandbox_user() -> tuple[int, int] | None:
    """(uid, gid) children drop to: `nobody` when the server runs as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # pointers must not be cut to a C int
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _filter(pid: int) -> bytes:
    """The seccomp program for the process `pid`: right arch, read-only opens, the calls that
    name a process only on this one, the allow-list, EPERM for the rest.

    Classic BPF jumps forward only, by a count of instructions; `resolve` turns the labels
    below into those counts. Arguments are 64-bit, but a pid_t is read by the kernel as its
    low 32 bits, so those are what is compared."""
    code: list[tuple[int, int, str | None, str | None]] = []  # (op, k, jump if true, if false)
    labels: dict[str, int] = {}

    def op(kind: int, k: int, true: str | None = None, false: str | None = None) -> None:
        code.append((kind, k, true, false))

    def label(name: str) -> None:
        labels[name] = len(code)

    op(_LD_W_ABS, _ARCH)
    op(_JEQ_K, _AUDIT_ARCH_X86_64, false="kill")
    op(_LD_W_ABS, _NR)
    op(_JGE_K, _X32_SYSCALL_BIT, true="kill")             # the x32 ABI
    op(_JEQ_K, _OPENAT, true="openat")
    op(_JEQ_K, _OPEN, true="open")
    for number in _SELF_OR_ZERO:
        op(_JEQ_K, number, true="self or zero")
    for number in _SELF:
        op(_JEQ_K, number, true="self")
    for number in sorted(_ALLOWED_X86_64.values()):
        op(_JEQ_K, number, true="allow")
    op(_RET_K, _RET_ERRNO | errno.EPERM)
    label("openat")
    op(_LD_W_ABS, _arg(2))
    op(_JSET_K, _WRITE_FLAGS, true="read-only", false="allow")
    label("open")
    op(_LD_W_ABS, _arg(1))
    op(_JSET_K, _WRITE_FLAGS, true="read-only", false="allow")
    label("self or zero")                                # prlimit64, sched_getaffinity
    op(_LD_W_ABS, _arg(0))
    op(_JEQ_K, 0, true="allow")
    op(_JEQ_K, pid, true="allow", false="other process")
    label("self")                                        # tgkill: own thread group only
    op(_LD_W_ABS, _arg(0))
    op(_JEQ_K, pid, true="allow", false="other process")
    label("allow")
    op(_RET_K, _RET_ALLOW)
    label("read-only")
    op(_RET_K, _RET_ERRNO | errno.EACCES)
    label("other process")
    op(_RET_K, _RET_ERRNO | errno.EPERM)
    label("kill")
    op(_RET_K, _RET_KILL_PROCESS)

    def resolve(at: int, target: str | None) -> int:
        offset = 0 if target is None else labels[target] - at - 1
        assert 0 <= offset <= 0xFF, "a BPF jump goes forward by at most 255"
        return offset

    return b"".join(struct.pack("=HBBI", kind, resolve(at, true), resolve(at, false), k)
                    for at, (kind, k, true, false) in enumerate(code))


def _arg(number: int) -> int:
    """Offset of system call argument `number`'s low 32 bits in `struct seccomp_data`
    (little-endian)."""
    return 16 + 8 * number


def _seccomp() -> None:
    if platform.machine() != "x86_64":
        raise OSError(f"no system call table for {platform.machine()}")
    code = _filter(os.getpid())
    buffer = ctypes.create_string_buffer(code)
    program = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buffer))
    fprog = ctypes.create_string_buffer(program)
    _check(_libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
           "seccomp")


def _network() -> None:
    _check(_libc().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def _user(user: tuple[int, int] | None) -> None:
    if user is None:
        raise OSError("the server does not run as root: children keep its user")
    uid, gid = user
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _private() -> None:
    libc = _libc()
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    # After the user change (which clears it), before seccomp (which forbids prctl).
    parent = os.getppid()
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if os.getppid() != parent:  # the fork server died before the line above
        os._exit(_EXIT_ORPHANED)


@dataclass(frozen=True)
class Isolation:
    """Which layers a child enters: each is "on" or why it is not available here."""

    layers: dict[str, str]

    def on(self, layer: str) -> bool:
        return self.layers.get(layer) == "on"

    def summary(self) -> str:
        return ", ".join(f"{name} {state}" for name, state in self.layers.items())


def enter(limit: object, *, required: Isolation | None) -> Isolation:
    """Enter every layer (in the child, after fork); `limit()` applies the rlimits.

    With `required` (the start-up probe's answer), a layer that held there must hold now, or
    the child stops: a run never goes ahead with less isolation than `serve` reported.
    """
    states: dict[str, str] = {}
    steps = (("network", _network), ("user", lambda: _user(sandbox_user())),
             ("private", _private), ("limits", limit), ("seccomp", _seccomp))
    for name, step in steps:
        try:
            step()  # type: ignore[operator]
            states[name] = "on"
        except OSError as exc:
            if required is not None and required.on(name):
                raise
            states[name] = f"unavailable ({exc})"
    return Isolation(states)


def harden_parent() -> None:
    """Make this process's /proc entries unreadable to processes of its own user (children
    that could not drop to another user): environ, mem, fd, maps become root's."""
    _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
