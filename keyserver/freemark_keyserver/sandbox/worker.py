"""What a sandbox child does with one request: load and vet one untrusted model, run it on
one or more trigger sets, answer with activations only.

The child is forked by the warm fork server (`freemark_keyserver.sandbox.forkserver`), which imported
torch and the export deserializer once and holds no secret. Before `serve` runs, the child has
entered its isolation layers (`sandbox_isolation.enter`: no network, another user, no new
privileges, the rlimits of `limit_self`, a seccomp allow-list) and holds only its data socket
and read-only descriptors of its input files, which it reads as ``/proc/self/fd/N``.

The protocol on the data socket is a conversation: the parent sends a request, the child
answers it, and the parent may send another before it shuts its side down. Each message is
framed by its length (8 bytes, big-endian), so either side knows when one is complete:

1. request: `np.save` frames (never pickle): a JSON header as uint8 (``model``, ``weights``,
   and ``sets``: one ``{"layer", "pooling", "has_mask", "probes"}`` per trigger set), then
   each set's inputs and, if announced, its attention mask. The child appends ``probes``
   alignment probes to each set itself (`freemark.scheme.probes.with_probes`). Triggers are secret
   and never touch disk. ``fingerprint: false`` (`SKIP_FINGERPRINT`) leaves a `.pt2`'s
   weights unhashed. The first request's ``model`` and ``weights`` are loaded once; later
   requests only add trigger sets for the same model;
2. reply: ``OK`` (b"K"), the 64 identity bytes (fingerprint ‖ architecture digest) as uint8,
   then per set a status frame (JSON {"kind", "message"} as uint8; kind "ok" is followed by
   the float32 activation matrix); or ``REFUSED`` (b"R") and one status frame when the model
   could not be read at all, after which the child exits. Kinds: "invalid_model",
   "invalid_input", "resource", "internal"; messages are one line without traceback.

Several trigger sets in one request, and further requests after the first, let Register read
an upload and then judge it against every earlier same-family registration with one model
load; a set that fails does not spoil the others.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import struct
from collections.abc import Callable
from typing import Any

OK = b"K"
REFUSED = b"R"
LENGTH = struct.Struct(">Q")  # the frame of every message on the data socket
# A request header key: False skips hashing a `.pt2`'s weights (32 zero bytes stand in).
# Verify does not use the suspect's fingerprint, and hashing 100 MB of weights costs 0.1 s.
FINGERPRINT_KEY = "fingerprint"
SKIP_FINGERPRINT = {FINGERPRINT_KEY: False}
MAX_MESSAGE_CHARS = 500
_OOM_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "failed to map segment",
    "bad_alloc",
    "could not create a primitive",  # oneDNN, when its buffers cannot be mapped
)


class _Refused(Exception):
    """A failure to report to the parent as {"kind": kind, "message": message}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def _read_request(raw: bytes) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """The JSON header and, for each trigger set it announces, (inputs, mask or None)."""
    import numpy as np

    buffer = io.BytesIO(raw)
    try:
        header = json.loads(np.load(buffer, allow_pickle=False).tobytes())
        sets = []
        for spec in header["sets"]:
            inputs = np.load(buffer, allow_pickle=False)
            mask = np.load(buffer, allow_pickle=False) if spec.get("has_mask") else None
            sets.append((inputs, mask))
    except (ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise _Refused(
            "internal", f"malformed request from the parent: {_first_line(exc)}"
        ) from exc
    return header, sets


def _load(header: dict[str, Any]) -> tuple[Any, bytes]:
    """The untrusted program as a module to capture from, and its identity (weights fingerprint
    ‖ architecture digest). The one place a `.pt2` file is read."""
    from freemark.formats.pt2 import apply_weights, architecture_digest, fingerprint, load_program
    from freemark.formats.pt2_vetting import vet_program

    program = load_program(header["model"])
    vet_program(program)
    model = apply_weights(program, header["weights"]) if header.get("weights") else program
    state = model if header.get("weights") else program
    weights = fingerprint(state) if header.get(FINGERPRINT_KEY, True) else bytes(32)
    return model, weights + architecture_digest(state)


Runner = Callable[[dict[str, Any], Any], Any]


def _runner(header: dict[str, Any], sets: list[tuple[Any, Any]]) -> tuple[bytes, Runner]:
    """The model's identity and a function from (set spec, TriggerSet) to activations on the
    set's triggers followed by its ``probes`` alignment probes (`freemark.scheme.probes.with_probes`,
    built here from the triggers, so the request carries the triggers only).

    A `.pt2` is loaded once for every set; a Hugging Face checkpoint or an ONNX model goes to
    `freemark_keyserver.sandbox.formats`, whose loaders read one layer per load (the first set is read
    once more for the identity).
    """
    from freemark.scheme.activations import capture
    from freemark.scheme.probes import with_probes
    from freemark.scheme.triggers import TriggerSet
    from freemark_keyserver.sandbox import formats

    def probed(spec: dict[str, Any], triggers: TriggerSet) -> TriggerSet:
        return with_probes(triggers, int(spec.get("probes", 0)))

    if formats.handles(header):  # Hugging Face checkpoints and ONNX: their own safe loaders
        def other(spec: dict[str, Any], triggers: TriggerSet) -> Any:
            return formats.sandboxed_activations({**header, **spec}, probed(spec, triggers))
        if not sets:
            raise _Refused("internal", "a request without trigger sets")
        first = other(header["sets"][0], TriggerSet(inputs=sets[0][0], attention_mask=sets[0][1]))
        return first[1], lambda spec, triggers: other(spec, triggers)[0]
    model, identity = _load(header)

    def program(spec: dict[str, Any], triggers: TriggerSet) -> Any:
        activations, _ = capture(model, spec["layer"], probed(spec, triggers),
                                 pooling=spec["pooling"])
        return activations
    return identity, program


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


def _frame(array: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()  # np.save wants a seekable file; the socket is not
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _status(payload: dict[str, str]) -> bytes:
    import numpy as np

    return _frame(np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8))


Loaded = tuple[bytes, Runner]  # the model's identity and its runner, once the model is read


def answer(raw: bytes, loaded: Loaded | None) -> tuple[bytes, Loaded | None]:
    """The child's whole reply to one request (module doc, step 2), and the loaded model for
    the next request (None: it could not be read, so the conversation ends); never raises."""
    import numpy as np

    from freemark.scheme.triggers import TriggerSet

    try:
        header, sets = _read_request(raw)
        if loaded is None:
            loaded = _runner(header, sets)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as a report
        refusal = _classify(exc)
        reply = REFUSED + _status({"kind": refusal.kind,
                                   "message": str(refusal)[:MAX_MESSAGE_CHARS]})
        return reply, loaded
    identity, run = loaded
    parts = [OK, _frame(np.frombuffer(identity, dtype=np.uint8))]
    for spec, (inputs, mask) in zip(header["sets"], sets):
        try:  # one set failing (another owner's triggers) leaves the others' answers intact
            activations = run(spec, TriggerSet(inputs=inputs, attention_mask=mask))
        except Exception as exc:  # noqa: BLE001
            refusal = _classify(exc)
            parts.append(_status({"kind": refusal.kind,
                                  "message": str(refusal)[:MAX_MESSAGE_CHARS]}))
            continue
        parts.append(_status({"kind": "ok", "message": ""}))
        # float32 on the wire: torch computes in float32, so nothing is lost, and the cap on
        # what the parent reads fits twice the units.
        parts.append(_frame(np.ascontiguousarray(activations, dtype=np.float32)))
    return b"".join(parts), loaded


def _read_exactly(fd: int, size: int) -> bytes | None:
    """`size` bytes from `fd`, or None at a clean end of the conversation (EOF first)."""
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            if missing == size:
                return None
            raise EOFError("the parent's request ended early")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(data_fd: int) -> int:
    """Answer requests from `data_fd` until the parent shuts its side; the exit status."""
    import warnings

    warnings.simplefilter("ignore")
    loaded: Loaded | None = None
    while (prefix := _read_exactly(data_fd, LENGTH.size)) is not None:
        request = _read_exactly(data_fd, LENGTH.unpack(prefix)[0])
        if request is None:
            raise EOFError("the parent's request ended early")
        reply, loaded = answer(request, loaded)
        _write_all(data_fd, LENGTH.pack(len(reply)) + reply)
        if loaded is None:
            break
    return 0
