"""The sandbox's child process: limit itself, load and vet one untrusted model, print activations.

Started by `freemark_keyserver.sandbox.run_in_sandbox` as
`python -m freemark_keyserver.sandbox_worker` with a minimal environment (no secrets), an empty
working directory and only stdin, stdout and stderr open. The order below is the point:

1. set resource limits on itself, before importing numpy, torch or our code, so even import-time
   and load-time work is bounded (limits come on the command line: they are not secret);
2. move stdout to a private descriptor and point fd 1 at stderr, so nothing the model or a
   library prints can corrupt the result;
3. read the request from stdin as `np.save` frames (never pickle): a JSON header as uint8, the
   trigger inputs, optionally the attention mask. The triggers are secret and never touch disk;
4. load with `freemark.modelfile.load_program` (never unpickles), vet the graph, optionally put
   `.safetensors` weights into it, capture the layer's activations; a Hugging Face checkpoint
   or an ONNX model goes to `freemark_keyserver.formats` instead;
5. write only the activation matrix (`np.save`, allow_pickle=False) to the private stdout and
   exit 0; or write one JSON line {"kind", "message"} to stderr and exit `EXIT_REFUSED`, kind
   being "invalid_model", "invalid_input", "resource" or "internal", message one line and no
   traceback.

Limits are best effort without kernel namespaces: RLIMIT_FSIZE=0 stops writing file data but not
creating an empty file; RLIMIT_NPROC=0 stops fork and threads only for a non-root user. The
process still runs as the server's user and could read what that user reads, were an op that
opens files to slip past vetting: keep secrets out of files that user can read, or start the
server so that its sandbox runs under another user. The main defences are that nothing is
unpickled, that the graph is vetted, and that this process holds no secret but the triggers it
must run on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import sys
import tempfile
from typing import Any, BinaryIO

EXIT_REFUSED = 3
MAX_MESSAGE_CHARS = 500
_OOM_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "failed to map segment",
    "bad_alloc",
)


class _Refused(Exception):
    """A failure to report to the parent as {"kind": kind, "message": message}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="freemark_keyserver.sandbox_worker")
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--open-files", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    return parser.parse_args(argv)


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


def _read_request(stream: BinaryIO) -> tuple[dict[str, Any], Any, Any]:
    import numpy as np

    buffer = io.BytesIO(stream.read())
    try:
        header = json.loads(np.load(buffer, allow_pickle=False).tobytes())
        inputs = np.load(buffer, allow_pickle=False)
        mask = np.load(buffer, allow_pickle=False) if header.get("has_mask") else None
    except (ValueError, OSError, EOFError) as exc:
        raise _Refused(
            "internal", f"malformed request from the parent: {_first_line(exc)}"
        ) from exc
    return header, inputs, mask


def _activations(header: dict[str, Any], inputs: Any, mask: Any) -> tuple[Any, bytes]:
    """The activation matrix and the model's identity (weights fingerprint ‖ architecture digest)."""
    from freemark.activations import capture
    from freemark.modelfile import apply_weights, architecture_digest, fingerprint, load_program
    from freemark.triggers import TriggerSet
    from freemark_keyserver import formats
    from freemark_keyserver.vetting import vet_program

    if formats.handles(header):  # Hugging Face checkpoints and ONNX: their own safe loaders
        return formats.sandboxed_activations(header, TriggerSet(inputs=inputs, attention_mask=mask))
    program = load_program(header["model"])
    vet_program(program)
    model = apply_weights(program, header["weights"]) if header.get("weights") else program
    activations, _ = capture(
        model,
        header["layer"],
        TriggerSet(inputs=inputs, attention_mask=mask),
        pooling=header["pooling"],
    )
    state = model if header.get("weights") else program
    return activations, fingerprint(state) + architecture_digest(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:MAX_MESSAGE_CHARS]


def _out_of_memory(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError) or any(m in str(seen).lower() for m in _OOM_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _classify(exc: BaseException) -> _Refused:
    """Turn an exception from loading or running the model into a report for the parent."""
    from freemark.errors import InvalidInputError, ModelFileError

    if isinstance(exc, _Refused):
        return exc
    if _out_of_memory(exc):
        return _Refused("resource", f"out of memory under the sandbox limit ({_first_line(exc)})")
    if isinstance(exc, ModelFileError):
        return _Refused("invalid_model", _first_line(exc))
    if isinstance(exc, InvalidInputError):
        return _Refused("invalid_input", _first_line(exc))
    return _Refused("internal", f"{type(exc).__name__}: {_first_line(exc)}")


def _report(refusal: _Refused) -> int:
    line = json.dumps({"kind": refusal.kind, "message": str(refusal)[:MAX_MESSAGE_CHARS]})
    os.write(2, b"\n" + line.encode() + b"\n")
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    """Run one request; the exit status and stdout/stderr are the protocol (module doc)."""
    args = _parse_args(argv)
    limit_self(
        memory_bytes=args.memory_bytes,
        cpu_seconds=args.cpu_seconds,
        open_files=args.open_files,
        threads=args.threads,
    )
    # tempfile would probe for a writable directory by writing a file, which RLIMIT_FSIZE=0
    # fails; torch asks for one at import (a cache path it never writes to while we run).
    tempfile.tempdir = os.getcwd()
    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        import warnings

        import numpy as np
        import torch

        warnings.simplefilter("ignore")  # keep stderr for our one-line report
        torch.set_num_threads(args.threads)
    except Exception as exc:  # noqa: BLE001 - only the limits stand between python and torch
        return _report(
            _Refused("resource", f"cannot start under the sandbox limits ({_first_line(exc)})")
        )
    try:
        header, inputs, mask = _read_request(sys.stdin.buffer)
        activations, identity = _activations(header, inputs, mask)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as a report
        return _report(_classify(exc))
    result = io.BytesIO()  # np.save wants a seekable file; stdout is a pipe
    np.save(result, np.frombuffer(identity, dtype=np.uint8), allow_pickle=False)
    np.save(result, np.ascontiguousarray(activations, dtype=np.float64), allow_pickle=False)
    with os.fdopen(result_fd, "wb") as out:
        out.write(result.getbuffer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
