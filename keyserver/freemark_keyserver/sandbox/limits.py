"""What one sandboxed run may use, and how both sides apply it (shared by parent and child).

The parent (`pool`) starts the fork server with `worker_environment` and hands each run the
rlimit fields of its `SandboxLimits` (`child_limits`); the child (`forkserver`, through
`isolation.enter`) applies them to itself with `limit_self`. The wall-clock deadline and the
output cap stay with the parent, which enforces them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import freemark
import freemark_keyserver
from freemark.errors import InvalidInputError
from freemark.formats.huggingface import MAX_PARAMETERS

__all__ = ["REPLY_COPIES", "GiB", "MiB", "SandboxLimits", "child_limits", "limit_self", "worker_environment"]

MiB = 1 << 20
GiB = 1 << 30
# What a reply of R bytes costs the server at most, in R: the buffer it is read into and
# parsed in place (`protocol.decode_reply`), and the float64 activations made from it (2 R).
# Measured: exactly 3.0 R for 32, 128 and 256 MiB replies (bench/sandbox_reply.py).
REPLY_COPIES = 3


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. The defaults fit the models the TTP is meant for.

    memory_bytes: RLIMIT_AS of a run before its model is counted (the base of `for_model`).
        4 GiB: torch 2.13 (CPU) alone needs about 0.8 GiB of address space to import and run a
        small CNN (measured; 0.5 GiB fails), which leaves room for one forward pass's
        activations (capture reads at most 256 inputs and 2 MiB of them a pass: 256 at
        224 x 224 ran EfficientNet-Lite0 out of a 4 GiB limit) and small models.
    memory_per_model_byte: what each byte of a run's model files adds to its RLIMIT_AS. 1.5:
        a checkpoint's weights are mapped once, in their stored dtype (1x: RLIMIT_AS counts the
        mapping); the rest covers transient copies of one tensor at a time (the fingerprint
        reads each tensor's bytes; a tensor stored in a minority dtype is cast) and the
        activations that grow with the model's width.
    max_memory_bytes: the operator's ceiling on any run's RLIMIT_AS. 16 GiB: a 2 B-parameter
        bf16 decoder (4 GiB of weights: 4 + 1.5 x 4 = 10 GiB) fits with room.
    max_parameters: the parameter count a checkpoint's config may imply
        (`freemark.formats.huggingface.MAX_PARAMETERS` by default; `serve --max-parameters`),
        checked in the child before anything is built.
    cpu_seconds: RLIMIT_CPU. 120 s: importing torch costs 2-3 s, a digits CNN on 100 triggers
        under 1 s, a ResNet-50 on a few hundred triggers tens of seconds on one core.
    wall_seconds: the parent's deadline for each request to a child (Register's follow-up
        request, the prior-claim sets, gets its own), which also bounds a worker that sleeps
        or blocks and so uses no CPU. Above cpu_seconds, so a busy single-threaded run meets the clearer CPU
        limit first.
    open_files: RLIMIT_NOFILE. 64: importing torch and loading a model need fewer than 8 at once.
    threads: torch/OpenMP/MKL threads. 1: RLIMIT_CPU counts every thread, a verify should not
        starve the server's other requests, and with one thread the worker can also forbid
        itself new processes and threads (RLIMIT_NPROC=0).
    max_output_bytes: cap on what is read back from one child, all its replies together
        (activations travel as float32). 512 MiB: 4 bytes x 2,048 inputs (1,024 triggers and
        as many probes) x 65,536 units. The server holds what it read while it is judged, at
        most `REPLY_COPIES` times this per running worker (`reply_bytes`).
    """

    memory_bytes: int = 4 * GiB
    memory_per_model_byte: float = 1.5
    max_memory_bytes: int = 16 * GiB
    max_parameters: int = MAX_PARAMETERS
    cpu_seconds: int = 120
    wall_seconds: float = 180.0
    open_files: int = 64
    threads: int = 1
    max_output_bytes: int = 512 * MiB

    @property
    def reply_bytes(self) -> int:
        """The most one running worker's replies cost the server's memory: `REPLY_COPIES` x
        `max_output_bytes`. The pool's default worker count budgets it (`pool.default_workers`)."""
        return REPLY_COPIES * self.max_output_bytes

    def __post_init__(self) -> None:
        for name in (
            "memory_bytes",
            "memory_per_model_byte",
            "max_memory_bytes",
            "max_parameters",
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
        if self.max_memory_bytes < self.memory_bytes:
            raise InvalidInputError(f"SandboxLimits.max_memory_bytes ({self.max_memory_bytes}) is "
                                    f"below the base memory_bytes ({self.memory_bytes})")

    def with_cpu_seconds(self, cpu_seconds: int) -> SandboxLimits:
        """These limits with RLIMIT_CPU `cpu_seconds` (the operator's `serve
        --sandbox-cpu-seconds`) and the wall-clock deadline at the same ratio to it as
        before, so the deadline stays above the CPU limit and a busy single-threaded run
        still meets the clearer CPU limit first."""
        return dataclasses.replace(self, cpu_seconds=cpu_seconds,
                                   wall_seconds=cpu_seconds * self.wall_seconds / self.cpu_seconds)

    def for_model(self, model_bytes: int) -> SandboxLimits:
        """These limits for a run whose model files hold `model_bytes` together: RLIMIT_AS =
        min(max_memory_bytes, memory_bytes + memory_per_model_byte x model_bytes)."""
        grown = self.memory_bytes + math.ceil(self.memory_per_model_byte * model_bytes)
        return dataclasses.replace(self, memory_bytes=min(self.max_memory_bytes, grown))


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


def child_limits(limits: SandboxLimits) -> dict[str, int]:
    """The fields a child applies to itself (`limit_self`'s keywords), as the parent sends them
    to the fork server: at its start (for the isolation probe) and with every run."""
    fields = asdict(limits)
    return {name: fields[name] for name in ("memory_bytes", "cpu_seconds", "open_files",
                                            "threads")}


def limit_self(*, memory_bytes: int, cpu_seconds: int, open_files: int, threads: int) -> None:
    """Apply the sandbox's rlimits to this process (hard limits too, so they cannot be raised).

    RLIMIT_AS rather than RLIMIT_DATA: it bounds every mapping, the memory-mapped model and
    shared libraries included, and torch 2.13 (CPU) works under it (measured: importing torch and
    running a small CNN peaks near 0.8 GiB of address space with one thread; 0.5 GiB fails).
    The CPU hard limit sits a second above the soft one: SIGXCPU first, then SIGKILL.
    RLIMIT_NPROC counts threads too, so it is only closed when torch runs single-threaded.
    """
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if threads == 1:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing us without a report.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
