"""Run an untrusted model in a separate, limited process; get back only its activations.

A suspect model is a program written by whoever uploaded it. The key server never loads one in
its own process, which holds the master key and every owner's keys. Runs go to a
`SandboxPool` (`sandbox_pool`): a warm fork server started before any key is read, with a
minimal environment (`worker_environment`: PATH, PYTHONPATH to import our packages, thread
counts, HOME and TMPDIR in a fresh directory; never the parent's, so no FREEMARK_* secret),
which forks one child per model. The child enters the isolation layers of
`sandbox_isolation` (network, user, private, limits from `SandboxLimits`, seccomp), reads
the model through descriptors and answers on a socket (`sandbox_worker`).

`run_model` and `run_batch` take the pool to use (the server's, built by `create_server`),
or start one process-wide pool on first use (`shared_pool`, for the operator's CLI and
tests). The parent caps what it reads, parses the answer with allow_pickle=False and checks
each matrix is finite with one row per trigger. Errors are typed: the model's own problems
come back as `freemark.errors.ModelFileError` / `InvalidInputError` with the child's one-line
message; the sandbox's as `SandboxError` and its subclasses. No traceback or trigger data
crosses over.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import freemark
import freemark_keyserver
from freemark.errors import InvalidInputError, ModelFileError
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.sandbox.errors import (
    SandboxBusy,
    SandboxError,
    SandboxResourceError,
    SandboxTimeout,
)
from freemark_keyserver.sandbox.pool import SandboxPool, Then, TriggerRun, default_workers

__all__ = [
    "SandboxBusy",
    "SandboxError",
    "SandboxLimits",
    "SandboxResourceError",
    "SandboxResult",
    "SandboxTimeout",
    "TriggerRun",
    "run_batch",
    "run_in_sandbox",
    "run_model",
    "shared_pool",
    "worker_environment",
]

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. The defaults fit the models the TTP is meant for.

    memory_bytes: RLIMIT_AS. 4 GiB: torch 2.13 (CPU) alone needs about 0.8 GiB of address space
        to import and run a small CNN (measured; 0.5 GiB fails), which leaves room for a model of
        a few hundred MB plus one forward pass's activations (capture reads at most 256 inputs
        and 2 MiB of them a pass: 256 at 224 x 224 ran EfficientNet-Lite0 out of this limit).
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
    max_output_bytes: cap on the reply read back (activations travel as float32). 512 MiB:
        4 bytes x 2,048 inputs (1,024 triggers and as many probes) x 65,536 units; the reply
        is held by the server while it is judged, one per running worker.
    """

    memory_bytes: int = 4 * GiB
    cpu_seconds: int = 120
    wall_seconds: float = 180.0
    open_files: int = 64
    threads: int = 1
    max_output_bytes: int = 512 * MiB

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


_SHARED: SandboxPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> SandboxPool:
    """One process-wide pool, started on first use with the default limits and worker count."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            limits = SandboxLimits()
            workers = default_workers(limits.memory_bytes)
            _SHARED = SandboxPool(workers=workers, queue=4 * workers, limits=limits).start()
        return _SHARED


def run_in_sandbox(
    model_path: Path,
    *,
    layer: str,
    pooling: int,
    triggers: TriggerSet,
    weights_path: Path | None = None,
    limits: SandboxLimits = SandboxLimits(),
    pool: SandboxPool | None = None,
) -> np.ndarray:
    """Activations only; see `run_model`."""
    return run_model(model_path, layer=layer, pooling=pooling, triggers=triggers,
                     weights_path=weights_path, limits=limits, pool=pool).activations


def run_model(
    model_path: Path,
    *,
    layer: str,
    pooling: int,
    triggers: TriggerSet,
    weights_path: Path | None = None,
    probes: int = 0,
    limits: SandboxLimits = SandboxLimits(),
    options: dict[str, Any] | None = None,
    pool: SandboxPool | None = None,
) -> SandboxResult:
    """Activations ((len(triggers) + probes, units) float64) of `layer` of the `.pt2` at
    `model_path`, on the triggers and then on `probes` alignment probes derived from them
    (`freemark.scheme.probes.with_probes`, built in the sandbox child).

    `weights_path` (`.safetensors`) replaces the program's weights. Raises ModelFileError for a
    file that is not a safe, vetted program; InvalidInputError when it cannot run on the
    triggers; SandboxTimeout, SandboxResourceError, SandboxBusy or SandboxError when the sandbox
    gives up; `cancellation.CallEnded` when the gRPC call it serves has ended.
    """
    identity, results = run_batch(model_path, [TriggerRun(layer, pooling, triggers, probes)],
                                  weights_path=weights_path, limits=limits, options=options,
                                  pool=pool)
    if isinstance(results[0], Exception):
        raise results[0]
    return SandboxResult(results[0], identity[:32], identity[32:])


def run_batch(
    model_path: Path,
    runs: Sequence[TriggerRun],
    *,
    weights_path: Path | None = None,
    limits: SandboxLimits = SandboxLimits(),
    options: dict[str, Any] | None = None,
    then: Then | None = None,
    pool: SandboxPool | None = None,
) -> tuple[bytes, list[np.ndarray | Exception]]:
    """One load of the model, several trigger sets: its identity (fingerprint ‖ architecture
    digest) and, per run, the activations or the exception that run alone raised. `then`
    may ask for more runs of the same load once it has seen the first answer
    (`SandboxPool.run`)."""
    for path in (model_path, weights_path):
        if path is not None and not Path(path).exists():
            raise ModelFileError(f"{Path(path).name}: no such file")
    return (pool or shared_pool()).run(model_path, runs, weights_path=weights_path,
                                       limits=limits, options=options, then=then)


@dataclass(frozen=True)
class SandboxResult:
    """What a sandbox run hands back: activations and the model's identity, nothing else."""

    activations: np.ndarray
    fingerprint: bytes
    architecture_digest: bytes
