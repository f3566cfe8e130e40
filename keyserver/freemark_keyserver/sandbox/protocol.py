"""The conversation on a sandbox child's data socket, both directions (shared by both sides).

The parent (`pool`) encodes requests and decodes replies; the child (`worker`) decodes
requests and encodes replies. The child's descriptors are numbered by the fork server
(`forkserver`): the data socket is `DATA_FD`, the inputs follow it (`MODEL_PATH`,
`WEIGHTS_PATH`).

The parent sends a request, the child answers it, and the parent may send another before it
shuts its side down. Each message is framed by its length (`LENGTH`: 8 bytes, big-endian), so
either side knows when one is complete:

1. request: `np.save` frames (never pickle): a JSON header as uint8 (``model``, ``weights``,
   and ``sets``: one ``{"layer", "pooling", "has_mask", "probes", "width"}`` per trigger set,
   a `TriggerRun` each, with ``probes_only`` for the probes' rows alone; ``layer`` null asks for a scan of every tensor, ``outputs`` true for
   the model's output scores instead of a layer, with ``claim`` true for an empty answer
   when the model does not take inputs of that kind), then each set's inputs and, if announced,
   its attention mask. The
   child appends ``probes`` alignment probes to each set itself
   (`freemark.scheme.probes.with_probes`). Triggers are secret and never touch disk. Options
   ride in the header too: the upload's format (`formats.sandbox_options`), and
   ``fingerprint: false`` (`SKIP_FINGERPRINT`), which leaves a `.pt2`'s, a checkpoint's, an
   adapter's or a GGUF's weights unhashed.
   The first request's ``model`` and ``weights`` are loaded once; later requests only add
   trigger sets for the same model;
2. reply: `OK` (b"K"), the 64 identity bytes (fingerprint ‖ architecture digest) as uint8,
   then per set a status frame (JSON {"kind", "message"} as uint8; kind "ok" is followed by
   the float32 activation matrix; a scan's status also says ``widths``, where each tensor's
   columns end in its matrix, and ``names``, what the model calls each, a `LayerScan`); or `REFUSED` (b"R") and one status frame when the model
   could not be read at all, after which the child exits. Kinds: "invalid_model",
   "invalid_input", "resource", "internal"; messages are one line without traceback.
   "run_failed" is a failure while the model ran on the set's triggers or probes (secret
   values): its message is the exception's class name only, which the parent keeps for
   the operator's log if it is a bare identifier (`SandboxRunFailed`) and drops otherwise.

Several trigger sets in one request, and further requests after the first, let Register read
an upload and then judge it against every earlier same-family registration with one model
load; a set that fails does not spoil the others. The parent reads a reply as if a hostile
program wrote it: no pickle, a fixed layout, finite float32 matrices of the announced shape,
read in place from the one buffer the reply arrived in (`decode_reply`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from freemark.errors import InvalidInputError, ModelFileError
from freemark.formats.onnx import MAX_TENSOR_NAME
from freemark.scheme.triggers import TriggerSet
from freemark.v1 import bundle_pb2
from freemark_keyserver.sandbox.errors import SandboxError, SandboxResourceError, SandboxRunFailed

__all__ = [
    "DATA_FD",
    "FINGERPRINT_KEY",
    "IDENTITY_BYTES",
    "INTERNAL",
    "INVALID_INPUT",
    "INVALID_MODEL",
    "LENGTH",
    "MAX_MESSAGE_CHARS",
    "MODEL_PATH",
    "OK",
    "OK_KIND",
    "REFUSED",
    "RESOURCE",
    "RUN_FAILED",
    "SKIP_FINGERPRINT",
    "WEIGHTS_PATH",
    "LayerScan",
    "ModelIdentity",
    "OutputScores",
    "Refusal",
    "TriggerRun",
    "check_activations",
    "decode_reply",
    "decode_request",
    "encode_refused",
    "encode_reply",
    "encode_request",
    "first_line",
]

OK = b"K"
REFUSED = b"R"
# A .npy frame's magic, version, length and header: numpy's parser reads at most 10,000
# header bytes (`read_array_header_1_0`'s `max_header_size`).
_NPY_HEADER_BYTES = 10 + 10_000
LENGTH = struct.Struct(">Q")  # the frame of every message on the data socket
IDENTITY_BYTES = 64  # weights fingerprint (32) ‖ architecture digest (32)
_DIGEST_BYTES = 32


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a run read: the SHA-256 fingerprint of its weights and the digest of its
    architecture (its family). The child sends the two as 64 bytes (`to_bytes`); the parent
    reads them back here, once, by name."""

    fingerprint: bytes
    architecture_digest: bytes

    def __post_init__(self) -> None:
        if len(self.fingerprint) != _DIGEST_BYTES or len(self.architecture_digest) != _DIGEST_BYTES:
            raise SandboxError("a model identity is two 32-byte digests")

    def to_bytes(self) -> bytes:
        return self.fingerprint + self.architecture_digest

    @classmethod
    def from_bytes(cls, raw: bytes) -> ModelIdentity:
        if len(raw) != IDENTITY_BYTES:
            raise SandboxError("the worker's output does not start with the model's identity")
        return cls(raw[:_DIGEST_BYTES], raw[_DIGEST_BYTES:])
# The child's descriptors, as the fork server numbers them: the data socket, then the inputs.
DATA_FD = 3
MODEL_PATH = "/proc/self/fd/4"
WEIGHTS_PATH = "/proc/self/fd/5"
# A request header key: False skips hashing the model's weights (32 zero bytes stand in).
# Verify does not use the suspect's fingerprint, and hashing 100 MB of weights costs 0.1 s
# (a 2.2 GB decoder's, 3 s).
FINGERPRINT_KEY = "fingerprint"
SKIP_FINGERPRINT = {FINGERPRINT_KEY: False}
MAX_MESSAGE_CHARS = 500
# Status kinds, and what the parent raises for each refusal.
OK_KIND = "ok"
INVALID_MODEL = "invalid_model"
INVALID_INPUT = "invalid_input"
RESOURCE = "resource"
INTERNAL = "internal"
RUN_FAILED = "run_failed"
_MAX_TYPE_NAME = 64


@dataclass(frozen=True)
class TriggerRun:
    """One trigger set to run the model on, at one layer and pooling, followed by `probes`
    alignment probes that the child derives from the triggers (`freemark.scheme.probes`).

    `layer` None is a scan (Register's prior-claim check): the child reads every tensor the
    model computes, whatever its name (`freemark.scheme.activations.capture_every`), each
    pooled by its rank, of `width` units only (0: any), and answers a `LayerScan`; nothing
    when the model does not take inputs of the triggers' kind.

    `outputs` reads no layer: the run answers the model's output scores on the inputs, (n,
    classes) float32 log-probabilities (`freemark.scheme.activations.output_scores`), what an
    output key is judged on (`outputs_of`). With `claim` (Register's prior-claim check of an
    earlier output key) the answer is (n, 0) when the model does not take inputs of the
    queries' kind at all (`freemark.scheme.activations.accepts`, decided on the model's
    declared inputs, never the query values) or is not a program, as a scan answers nothing
    then; a program that takes them and fails on them fails the run.

    `probes_only` answers the probes' rows alone: the triggers are still sent (the child
    derives the probes from them) but never run. Register's prior-claim runs read a claim
    signature from the probe rows only (`freemark_keyserver.claims.probe_rows`); running the
    anchor's triggers too cost a third of each of those forward passes, for rows it dropped
    (issue 20: 16 of 48 rows of a 1.1 B decoder's, about 2 s).
    """

    layer: str | None
    pooling: int
    triggers: TriggerSet
    probes: int = 0
    width: int = 0
    outputs: bool = False
    claim: bool = False
    probes_only: bool = False

    @classmethod
    def outputs_of(cls, inputs: np.ndarray, *, claim: bool = False) -> TriggerRun:
        """The run that reads a model's output scores on `inputs` (an output key's queries);
        `claim` for a prior-claim check (the class docstring)."""
        return cls("", bundle_pb2.POOLING_NONE, TriggerSet(inputs=np.asarray(inputs)),
                   outputs=True, claim=claim)

    @property
    def scans(self) -> bool:
        return self.layer is None

    @property
    def rows(self) -> int:
        """How many activation rows the run answers: the triggers, then the probes (the
        probes alone for `probes_only`)."""
        return self.probes if self.probes_only else len(self.triggers) + self.probes


class LayerScan(np.ndarray):
    """A scan's answer: the pooled activations of every tensor read, side by side in one
    matrix (rows: triggers, then probes), `widths` saying how many columns each takes and
    `names` what the model calls each (its graph's own names: they say which tensor a
    verdict read, never how it was found)."""

    widths: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def __array_finalize__(self, obj: Any) -> None:
        self.widths = tuple(getattr(obj, "widths", ()))
        self.names = tuple(getattr(obj, "names", ()))

    @classmethod
    def of(cls, rows: int, tensors: Sequence[tuple[str, np.ndarray]]) -> LayerScan:
        """The scan of (name, matrix) pairs, as `capture_every` lists them."""
        matrices = [matrix for _, matrix in tensors]
        columns = (np.concatenate(matrices, axis=1) if matrices
                   else np.zeros((rows, 0), dtype=np.float32))
        scan = np.ascontiguousarray(columns).view(cls)
        scan.widths = tuple(int(m.shape[1]) for m in matrices)
        scan.names = tuple(str(name) for name, _ in tensors)
        return scan

    def layers(self) -> list[np.ndarray]:
        """Each tensor's (rows, width) matrix, as a plain array: a view, in the scan's own
        dtype (float32 as the parent decodes it), so judging one tensor at a time copies
        only that one."""
        plain = np.asarray(self)
        return [plain[:, start:stop]
                for start, stop in itertools.pairwise(np.cumsum((0, *self.widths)))]


class OutputScores(np.ndarray):
    """An outputs run's answer (`TriggerRun.outputs_of`): the (n, classes) scores, and
    `architecture`, the model's exact architecture (`freemark.formats.pt2.shape_digest`),
    which the status frame carries beside them: an output key's panel must span two."""

    architecture: bytes = b""

    def __array_finalize__(self, obj: Any) -> None:
        self.architecture = bytes(getattr(obj, "architecture", b""))

    @classmethod
    def of(cls, scores: np.ndarray, architecture: bytes) -> OutputScores:
        answer = np.ascontiguousarray(scores).view(cls)
        answer.architecture = architecture
        return answer


class Refusal(Exception):
    """A failure the child reports as a status frame {"kind": kind, "message": message}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- request: the parent encodes, the child decodes -----------------------------------------


def encode_request(runs: Sequence[TriggerRun], has_weights: bool, options: dict[str, Any]
                   ) -> bytes:
    """A request (without its length frame) for `runs` of the model the child holds."""
    header = {**options, "model": MODEL_PATH, "weights": WEIGHTS_PATH if has_weights else None,
              "sets": [{"layer": r.layer, "pooling": int(r.pooling), "probes": int(r.probes),
                        "width": int(r.width), "outputs": bool(r.outputs),
                        "claim": bool(r.claim), "probes_only": bool(r.probes_only),
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


def decode_request(raw: bytes) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """The JSON header and, for each trigger set it announces, (inputs, mask or None)."""
    buffer = io.BytesIO(raw)
    try:
        header = json.loads(np.load(buffer, allow_pickle=False).tobytes())
        sets = []
        for spec in header["sets"]:
            inputs = np.load(buffer, allow_pickle=False)
            mask = np.load(buffer, allow_pickle=False) if spec.get("has_mask") else None
            sets.append((inputs, mask))
    except (ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise Refusal(INTERNAL, f"malformed request from the parent: {first_line(exc)}") from exc
    return header, sets


def first_line(exc: BaseException) -> str:
    """An exception's first line, capped: all a report may say about it."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:MAX_MESSAGE_CHARS]


# --- reply: the child encodes, the parent decodes -------------------------------------------


def _npy(array: Any) -> bytes:
    buffer = io.BytesIO()  # np.save wants a seekable file; the socket is not
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _status_frame(kind: str, message: str, **extra: Any) -> bytes:
    payload = {"kind": kind, "message": message[:MAX_MESSAGE_CHARS], **extra}
    return _npy(np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8))


def encode_refused(refusal: Refusal) -> bytes:
    """The reply when the model could not be read at all (the conversation ends)."""
    return REFUSED + _status_frame(refusal.kind, str(refusal))


def encode_reply(identity: bytes, results: Sequence[Any]) -> bytes:
    """The reply to a request: the model's identity, then per set its activations (any
    array-like) or its `Refusal`."""
    parts = [OK, _npy(np.frombuffer(identity, dtype=np.uint8))]
    for result in results:
        if isinstance(result, Refusal):
            parts.append(_status_frame(result.kind, str(result)))
            continue
        if isinstance(result, OutputScores):
            parts.append(_status_frame(OK_KIND, "", architecture=result.architecture.hex()))
            parts.append(_npy(np.ascontiguousarray(result, dtype=np.float32)))
            continue
        if isinstance(result, LayerScan):
            parts.append(_status_frame(OK_KIND, "", widths=list(result.widths),
                                       names=list(result.names)))
            parts.append(_npy(np.asarray(result)))
            continue
        parts.append(_status_frame(OK_KIND, ""))
        # float32 on the wire: torch computes in float32, so nothing is lost, and the cap on
        # what the parent reads fits twice the units.
        parts.append(_npy(np.ascontiguousarray(result, dtype=np.float32)))
    return b"".join(parts)


class _Frames:
    """The `.npy` frames of a reply, read in place: each array is a view on the reply's own
    buffer (no copy), its header read with numpy's safe parser (never pickle: an object dtype
    is refused before anything is built), its size checked against the bytes that are left."""

    def __init__(self, raw: memoryview) -> None:
        self._raw, self.at = raw, 0

    def next(self) -> np.ndarray:
        header = io.BytesIO(self._raw[self.at:self.at + _NPY_HEADER_BYTES])  # copies <= 10 KB
        try:
            if np.lib.format.read_magic(header) != (1, 0):  # what np.save writes for ours
                raise ValueError("not a version 1.0 .npy frame")
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(header)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise SandboxError("the worker's output is not a .npy array") from exc
        start = self.at + header.tell()
        count = math.prod(shape)
        if dtype.hasobject or fortran_order or start + count * dtype.itemsize > len(self._raw):
            raise SandboxError("the worker's output is not a .npy array")
        self.at = start + count * dtype.itemsize
        return np.frombuffer(self._raw, dtype=dtype, count=count, offset=start).reshape(shape)

    def status(self) -> tuple[str, str, Any, Any, Any]:
        """A status frame's kind, message, (a scan's) widths and names and (an outputs
        run's) architecture, None where it has none."""
        frame = self.next()
        try:
            report = json.loads(frame.tobytes())
            return (str(report["kind"]), str(report["message"])[:MAX_MESSAGE_CHARS],
                    report.get("widths"), report.get("names"), report.get("architecture"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SandboxError("the worker failed without a readable report") from exc


def _refusal(kind: str, message: str) -> Exception:
    if kind == RUN_FAILED:  # whatever else the child wrote is dropped here
        name = message if message.isidentifier() and len(message) <= _MAX_TYPE_NAME else "?"
        return SandboxRunFailed(name)
    if kind == INVALID_MODEL:
        return ModelFileError(message)
    if kind == INVALID_INPUT:
        return InvalidInputError(message)
    if kind == RESOURCE:
        return SandboxResourceError(message)
    return SandboxError(f"the worker failed: {message}")


def decode_reply(raw: bytes | bytearray | memoryview, rows: list[int],
                 scans: Sequence[bool] = (), outputs: Sequence[bool] = ()
                 ) -> tuple[ModelIdentity, list[np.ndarray | Exception]]:
    """A complete reply: the model's identity and, per set of `rows` inputs, its activations
    (for a set that `scans`, a `LayerScan`) or its refusal. Raises for a refusal of the
    whole model, or a reply that breaks the protocol (a compromised child gets no further
    than this).

    The reply is read where it lies (`_Frames`): the only copies made are a run's float64
    activations, one matrix at a time once its shape is checked; a scan stays float32, a
    view on `raw` (`LayerScan`). So a reply of R bytes costs the server at most 3 R while
    it is decoded (R + 2 R of float64), and 2 R (a run) or R (a scan) while it is judged."""
    view = memoryview(raw).cast("B")
    frames = _Frames(view[1:])
    if bytes(view[:1]) == REFUSED:
        raise _refusal(*frames.status()[:2])
    if bytes(view[:1]) != OK:
        raise SandboxError("the worker's output has no status")
    identity = frames.next()
    if identity.dtype != np.uint8 or identity.shape != (IDENTITY_BYTES,):
        raise SandboxError("the worker's output does not start with the model's identity")
    results: list[np.ndarray | Exception] = []
    for number, n_rows in enumerate(rows):
        kind, message, widths, names, architecture = frames.status()
        if kind != OK_KIND:
            results.append(_refusal(kind, message))
            continue
        if number < len(outputs) and outputs[number]:
            results.append(_check_outputs(frames.next(), n_rows, architecture))
            continue
        scan = number < len(scans) and scans[number]
        if scan != (widths is not None):
            raise SandboxError("the worker's output answers a run it was not asked for")
        if scan:
            results.append(_check_scan(frames.next(), n_rows, widths, names))
            continue
        results.append(check_activations(frames.next(), n_rows))
    if frames.at != len(view) - 1:
        raise SandboxError("the worker's output has trailing bytes")
    return ModelIdentity.from_bytes(identity.tobytes()), results


def _check_outputs(array: np.ndarray, n_rows: int, architecture: Any) -> OutputScores:
    """An outputs run's scores, checked like activations, with the architecture digest the
    status frame carried (64 hex digits, or the reply breaks the protocol)."""
    if not (isinstance(architecture, str) and len(architecture) == 2 * _DIGEST_BYTES
            and all(c in "0123456789abcdef" for c in architecture)):
        raise SandboxError("the worker's output scores lack the model's architecture")
    if array.dtype == np.dtype(np.float32) and array.shape == (n_rows, 0):  # a claim run's "no"
        return OutputScores.of(array, bytes.fromhex(architecture))
    return OutputScores.of(check_activations(array, n_rows), bytes.fromhex(architecture))


def _check_scan(array: np.ndarray, n_rows: int, widths: Any, names: Any) -> LayerScan:
    """A scan's matrix, widths and names, checked as `check_activations` checks one layer's
    (one name per tensor, each a string of at most `MAX_TENSOR_NAME` characters), and kept
    as it came (float32, in place): `LayerScan.layers` hands out one tensor at a time."""
    if not (isinstance(widths, list) and all(type(w) is int and w > 0 for w in widths)
            and array.ndim == 2 and sum(widths) == array.shape[1]):
        raise SandboxError("the worker returned a scan whose widths do not fit its matrix")
    if not (isinstance(names, list) and len(names) == len(widths)
            and all(isinstance(n, str) and len(n) <= MAX_TENSOR_NAME for n in names)):
        raise SandboxError("the worker returned a scan whose names do not fit its widths")
    if not widths:
        if array.dtype != np.dtype(np.float32) or array.shape[0] != n_rows:
            raise SandboxError("the worker returned a malformed empty scan")
        return LayerScan.of(n_rows, [])
    scan = _checked(array, n_rows).view(LayerScan)
    scan.widths, scan.names = tuple(widths), tuple(names)
    return scan


def _checked(array: np.ndarray, n_triggers: int) -> np.ndarray:
    """`array`, once it is a finite float32 (n_triggers, units) matrix."""
    if (
        array.dtype != np.dtype(np.float32)
        or array.ndim != 2
        or array.shape[0] != n_triggers
        or array.shape[1] < 1
    ):
        raise SandboxError(
            f"the worker returned a {array.dtype} array of shape {array.shape}, "
            f"expected float32 ({n_triggers}, units)"
        )
    # A float64 sum of finite float32 values cannot overflow (2**27 values of at most 3.4e38
    # each), and any NaN or infinity makes it NaN or infinite: all finite exactly when the
    # sum is, with no temporary array of the matrix's size.
    if not np.isfinite(array.sum(dtype=np.float64)):
        raise SandboxError("the worker returned non-finite activations")
    return array


def check_activations(array: np.ndarray, n_triggers: int) -> np.ndarray:
    """A finite (n_triggers, units) float32 matrix from the worker, as float64 (checked
    before it is converted, so a malformed one costs no copy)."""
    return _checked(array, n_triggers).astype(np.float64)
