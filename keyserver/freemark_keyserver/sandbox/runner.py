"""Run an untrusted model in a separate, limited process; get back only its activations.

A suspect model is a program written by whoever uploaded it. The key server never loads one in
its own process, which holds the master key and every owner's keys. Runs go to a
`SandboxPool` (`pool`): a warm fork server (`forkserver`) started before any key is read,
with a minimal environment (`limits.worker_environment`: PATH, PYTHONPATH to import our
packages, thread counts, HOME and TMPDIR in a fresh directory; never the parent's, so no
FREEMARK_* secret), which forks one child per model. The child enters the isolation layers of
`isolation` (network, user, private, limits from `SandboxLimits`, seccomp), reads the model
through descriptors and answers on a socket (`worker`, in the framing of `protocol`).

This module is the sandbox's face to the rest of the server: everything outside the package
goes through it (and the shared `limits`, `protocol`, `errors`, `formats`), never through the
pool, the worker, the fork server or the isolation layers. `start_pool` builds a pool (the
server's, by `ServerConfig.start_sandbox`); `LAYERS` and `Isolation` name what a pool reports
it stands on (the server's health).

`run_model` and `run_batch` take the pool to use (the server's, built by `create_server`),
or start one process-wide pool on first use (`shared_pool`, for the operator's CLI and
tests). The parent caps what it reads, parses the answer with allow_pickle=False and checks
each matrix is finite with one row per trigger. Errors are typed: the model's own problems
come back as `freemark.errors.ModelFileError` / `InvalidInputError` with the child's one-line
message when they are about the file; a failure while the model ran on the triggers as
`SandboxRunFailed`, whose message is fixed; the sandbox's as `SandboxError` and its
subclasses. No traceback or trigger data crosses over.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freemark.errors import ModelFileError
from freemark.scheme.triggers import TriggerSet
from freemark_keyserver.sandbox.errors import (
    RUN_FAILED,
    SandboxBusy,
    SandboxError,
    SandboxResourceError,
    SandboxRunFailed,
    SandboxTimeout,
)
from freemark_keyserver.sandbox.formats import PARAMETERS_KEY
from freemark_keyserver.sandbox.isolation import LAYERS, Isolation
from freemark_keyserver.sandbox.limits import SandboxLimits
from freemark_keyserver.sandbox.pool import SandboxPool, Then, default_workers
from freemark_keyserver.sandbox.protocol import LayerScan, ModelIdentity, TriggerRun

__all__ = [
    "LAYERS",
    "RUN_FAILED",
    "Isolation",
    "LayerScan",
    "ModelIdentity",
    "SandboxBusy",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResourceError",
    "SandboxResult",
    "SandboxRunFailed",
    "SandboxTimeout",
    "Then",
    "TriggerRun",
    "default_workers",
    "run_batch",
    "run_in_sandbox",
    "run_model",
    "shared_pool",
    "start_pool",
]


def start_pool(limits: SandboxLimits, *, workers: int | None = None, queue: int | None = None
               ) -> SandboxPool:
    """Start a sandbox pool: `workers` children at once (None: `pool.default_workers`, from
    the cores, the memory each child may map and what its replies cost the server) and
    `queue` runs waiting (None: 4 x workers)."""
    workers = workers or default_workers(limits)
    queue = 4 * workers if queue is None else queue
    return SandboxPool(workers=workers, queue=queue, limits=limits).start()


DEFAULT_LIMITS = SandboxLimits()  # frozen: one instance serves every default
_SHARED: SandboxPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> SandboxPool:
    """One process-wide pool, started on first use with the default limits and worker count."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = start_pool(DEFAULT_LIMITS)
        return _SHARED


def run_in_sandbox(
    model_path: Path,
    *,
    layer: str,
    pooling: int,
    triggers: TriggerSet,
    weights_path: Path | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
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
    limits: SandboxLimits = DEFAULT_LIMITS,
    options: dict[str, Any] | None = None,
    pool: SandboxPool | None = None,
) -> SandboxResult:
    """Activations ((len(triggers) + probes, units) float64) of `layer` of the `.pt2` at
    `model_path`, on the triggers and then on `probes` alignment probes derived from them
    (`freemark.scheme.probes.with_probes`, built in the sandbox child).

    `weights_path` (`.safetensors`) replaces the program's weights. Raises ModelFileError for a
    file that is not a safe, vetted program; InvalidInputError when it has no such layer;
    SandboxRunFailed when it fails on the triggers; SandboxTimeout, SandboxResourceError, SandboxBusy or SandboxError when the sandbox
    gives up; `cancellation.CallEnded` when the gRPC call it serves has ended.
    """
    identity, results = run_batch(model_path, [TriggerRun(layer, pooling, triggers, probes)],
                                  weights_path=weights_path, limits=limits, options=options,
                                  pool=pool)
    if isinstance(results[0], Exception):
        raise results[0]
    return SandboxResult(results[0], identity)


def run_batch(
    model_path: Path,
    runs: Sequence[TriggerRun],
    *,
    weights_path: Path | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
    options: dict[str, Any] | None = None,
    then: Then | None = None,
    pool: SandboxPool | None = None,
) -> tuple[ModelIdentity, list[np.ndarray | Exception]]:
    """One load of the model, several trigger sets: its identity and, per run, the activations or the exception that run alone raised. `then`
    may ask for more runs of the same load once it has seen the first answer
    (`SandboxPool.run`). The run's memory limit follows the size of its files
    (`SandboxLimits.for_model`), and the child is told the parameter cap."""
    size = 0
    for path in (model_path, weights_path):
        if path is not None and not Path(path).exists():
            raise ModelFileError(f"{Path(path).name}: no such file")
        size += 0 if path is None else Path(path).stat().st_size
    options = {**(options or {}), PARAMETERS_KEY: limits.max_parameters}
    return (pool or shared_pool()).run(model_path, runs, weights_path=weights_path,
                                       limits=limits.for_model(size), options=options, then=then)


@dataclass(frozen=True)
class SandboxResult:
    """What a sandbox run hands back: activations and the model's identity, nothing else."""

    activations: np.ndarray
    identity: ModelIdentity

    @property
    def fingerprint(self) -> bytes:
        return self.identity.fingerprint

    @property
    def architecture_digest(self) -> bytes:
        return self.identity.architecture_digest
