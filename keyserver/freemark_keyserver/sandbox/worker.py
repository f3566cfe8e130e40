"""What a sandbox child does with one request: load and vet one untrusted model, run it on
one or more trigger sets, answer with activations only.

The child is forked by the warm fork server (`freemark_keyserver.sandbox.forkserver`), which imported
torch and the export deserializer once and holds no secret. Before `serve` runs, the child has
entered its isolation layers (`isolation.enter`: no network, another user, no new
privileges, the rlimits of `limits.limit_self`, a seccomp allow-list) and holds only its data socket
and read-only descriptors of its input files, which it reads as ``/proc/self/fd/N``.

The conversation on the data socket, and both directions of its codec, are `protocol`'s; this
module decides what the child answers: which loader reads the model, and how a failure is
reported.

A failure is reported by what the child was doing when it happened. Reading, vetting and
locating the key layer in the uploaded file (`_classify`) depend on the uploader's bytes and
the key's public layer name only: their one-line message goes back, so the uploader learns
what is wrong with his file. Running the model on a key's triggers and the probes built from
them (`_run_failed`) may depend on those secret values (an index, a shape or a division
computed from them), so that report is one fixed status with no model-produced text: only
the exception's class name, for the operator's log (issue 18).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from freemark_keyserver.sandbox import protocol
from freemark_keyserver.sandbox.protocol import LENGTH, Refusal, first_line

_OOM_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "failed to map segment",
    "bad_alloc",
    "could not create a primitive",  # oneDNN, when its buffers cannot be mapped
)


def _load(header: dict[str, Any]) -> tuple[Any, bytes]:
    """The untrusted program as a module to capture from, and its identity (weights fingerprint
    ‖ architecture digest). The one place a `.pt2` file is read."""
    from freemark.formats.pt2 import apply_weights, architecture_digest, fingerprint, load_program
    from freemark.formats.pt2_vetting import vet_program

    program = load_program(header["model"])
    vet_program(program)
    model = apply_weights(program, header["weights"]) if header.get("weights") else program
    state = model if header.get("weights") else program
    weights = fingerprint(state) if header.get(protocol.FINGERPRINT_KEY, True) else bytes(32)
    return model, weights + architecture_digest(state)


Run = Callable[[Any], Any]  # a set's TriggerSet -> its activations (triggers, then probes)
# A set's spec -> its run (a `_Scan` for a `.pt2` scan), once the file is read for it.
Runner = Callable[[dict[str, Any]], "Run | _Scan"]


def _runner(header: dict[str, Any], sets: list[tuple[Any, Any]]) -> tuple[bytes, Runner]:
    """The model's identity and a function from a set spec to that set's run: everything that
    depends only on the file and the spec (loading, vetting, locating the layer) is done by
    the function, so its failures are the file's; the run it returns computes activations
    on the set's triggers followed by its ``probes`` alignment probes
    (`freemark.scheme.probes.with_probes`, built here from the triggers, so the request
    carries the triggers only), and its failures are the run's.

    A `.pt2` is loaded once for every set, and so is a Hugging Face checkpoint, adapter or
    GGUF (`freemark_keyserver.sandbox.formats.sandboxed_reader`: one build, one fingerprint);
    an ONNX model's loader reads one layer per load (the first set is read once more for the
    identity).
    """
    import numpy as np

    from freemark.formats.pt2 import shape_digest
    from freemark.scheme.activations import (
        accepts,
        as_module,
        capture,
        output_scores,
        resolve_layer,
    )
    from freemark.scheme.triggers import TriggerSet
    from freemark_keyserver.sandbox import formats

    def probed(spec: dict[str, Any], triggers: TriggerSet) -> TriggerSet:
        return _probed(triggers, int(spec.get("probes", 0)), bool(spec.get("probes_only")))

    if formats.handles(header):  # Hugging Face checkpoints and ONNX: their own safe loaders
        if not sets:
            raise Refusal(protocol.INTERNAL, "a request without trigger sets")
        identity, layer_of = formats.sandboxed_reader(header)

        def other(spec: dict[str, Any]) -> Run:
            if spec.get("outputs") and spec.get("claim"):  # no output key reads these: no claim
                return lambda triggers: protocol.OutputScores.of(
                    np.zeros((len(triggers.inputs), 0), np.float32), b"\0" * 32)
            if spec.get("outputs"):
                raise Refusal(protocol.INVALID_INPUT, "output keys read .pt2 programs only; "
                              "export the model with torch.export")
            run = layer_of({**header, **spec})

            def read(triggers: TriggerSet) -> Any:
                inputs = probed(spec, triggers)
                if spec.get("layer", "") is None:  # a scan (`TriggerRun`)
                    return protocol.LayerScan.of(len(inputs), run(inputs))
                return run(inputs)
            return read
        return identity, other
    model, identity = _load(header)
    module = as_module(model)  # unflattened once: every set reads the same module

    def program(spec: dict[str, Any]) -> Run | _Scan:
        if spec.get("outputs"):  # an output key's queries: the model's answers (`TriggerRun`)
            architecture = shape_digest(model)

            def answer(triggers: TriggerSet) -> Any:
                if spec.get("claim") and not accepts(model, triggers):
                    scores = np.zeros((len(triggers.inputs), 0), np.float32)
                else:
                    scores = output_scores(module, triggers.inputs)
                    if spec.get("claim") and scores.shape[1] == 0:
                        raise ValueError("a model that answers no class")
                return protocol.OutputScores.of(scores, architecture)
            return answer
        if spec["layer"] is None:  # a scan: every tensor, whatever its name (`TriggerRun`)
            return _Scan(model, int(spec.get("width", 0)), int(spec.get("probes", 0)),
                         bool(spec.get("probes_only")))
        resolve_layer(module, spec["layer"])  # the file's problem (no such layer): named
        return lambda triggers: capture(module, spec["layer"], probed(spec, triggers),
                                        pooling=spec["pooling"])[0]
    return identity, program


def _out_of_memory(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError) or any(m in str(seen).lower() for m in _OOM_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _classify(exc: BaseException) -> Refusal:
    """Turn an exception from reading the file (loading, vetting, locating the layer) into a
    report for the parent; its first line is about the uploader's own bytes."""
    from freemark.errors import InvalidInputError, ModelFileError

    if isinstance(exc, Refusal):
        return exc
    if _out_of_memory(exc):
        return Refusal(protocol.RESOURCE,
                       f"out of memory under the sandbox limit ({first_line(exc)})")
    if isinstance(exc, ModelFileError):
        return Refusal(protocol.INVALID_MODEL, first_line(exc))
    if isinstance(exc, InvalidInputError):
        return Refusal(protocol.INVALID_INPUT, first_line(exc))
    return Refusal(protocol.INTERNAL, f"{type(exc).__name__}: {first_line(exc)}")


def _run_failed(exc: BaseException) -> Refusal:
    """The report of a failure while the model ran on a key's triggers or probes: the fixed
    `protocol.RUN_FAILED` status carrying only the exception's class name. Its message, and
    anything else the model produced, may be computed from the secret triggers and never
    leaves the child. Running out of memory stays a resource refusal, with a fixed message:
    the vetting refuses every size computed from the inputs' values, so what a run maps
    does not depend on them, and the operator must see that his limit is too tight."""
    if _out_of_memory(exc):
        return Refusal(protocol.RESOURCE, "out of memory under the sandbox limit")
    return Refusal(protocol.RUN_FAILED, type(exc).__name__)


Loaded = tuple[bytes, Runner]  # the model's identity and its runner, once the model is read


def answer(raw: bytes, loaded: Loaded | None) -> tuple[bytes, Loaded | None]:
    """The child's whole reply to one request (`protocol`, step 2), and the loaded model for
    the next request (None: it could not be read, so the conversation ends); never raises."""
    from freemark.scheme.triggers import TriggerSet

    try:
        header, sets = protocol.decode_request(raw)
        if loaded is None:
            loaded = _runner(header, sets)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as a report
        return protocol.encode_refused(_classify(exc)), loaded
    identity, runner = loaded
    results: list[Any] = []
    runs: list[tuple[int, Run | _Scan, tuple[Any, Any]]] = []
    for spec, inputs in zip(header["sets"], sets):
        try:  # the file and the spec only: its failure is the uploader's to read
            runs.append((len(results), runner(spec), inputs))
            results.append(None)
        except Exception as exc:  # noqa: BLE001
            results.append(_classify(exc))
    # Every set is run to its end whatever an earlier one did: one set failing (another
    # owner's triggers) leaves the others' answers intact and their cost unchanged. Scans
    # of one kind share one forward pass (`_scan_together`); every other run is its own.
    scans: list[tuple[int, _Scan, TriggerSet]] = []
    for place, run, (inputs, mask) in runs:
        try:  # on the secret triggers: a fixed status, nothing the model wrote
            triggers = TriggerSet(inputs=inputs, attention_mask=mask)
            if isinstance(run, _Scan):
                scans.append((place, run, triggers))
            else:
                results[place] = run(triggers)
        except Exception as exc:  # noqa: BLE001
            results[place] = _run_failed(exc)
    for place, scanned in _scan_together(scans):
        results[place] = scanned
    return protocol.encode_reply(identity, results), loaded


@dataclass(frozen=True)
class _Scan:
    """What a runner gives for a `.pt2` scan (`TriggerRun` with no layer): every tensor the
    program computes on a set's triggers and its `probes` probes, of `width` units (0:
    any). Not run alone: `_scan_together` reads every scan of a request that can share a
    forward pass in one."""

    model: Any
    width: int
    probes: int
    probes_only: bool = False


def _probed(triggers: Any, probes: int, probes_only: bool) -> Any:
    """A set's inputs: its triggers followed by `probes` probes derived from them
    (`freemark.scheme.probes.with_probes`), or the probes alone (`TriggerRun.probes_only`)."""
    from freemark.scheme.probes import with_probes
    from freemark.scheme.triggers import TriggerSet

    inputs = with_probes(triggers, probes)
    if not probes_only:
        return inputs
    mask = inputs.attention_mask
    return TriggerSet(inputs=inputs.inputs[len(inputs.inputs) - probes:],
                      attention_mask=None if mask is None else mask[len(mask) - probes:])


def _scan_together(scans: list[tuple[int, _Scan, Any]]) -> list[tuple[int, Any]]:
    """Each scan's answer by its place in the request: scans of one width whose probed
    triggers are of one input kind are read in one forward pass
    (`freemark.scheme.activations.capture_every_sets`, issue 21: Register's candidate
    scans cost about one scan, not one each); a set the model failed on gets the fixed
    run-failure report, the others their `LayerScan`. A failure of the pass as a whole (a
    cap, the model's own crash) fails every scan of it the same way."""
    from freemark.scheme.activations import capture_every_sets

    answers: list[tuple[int, Any]] = []
    groups: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
    for place, scan, triggers in scans:
        try:  # probes are built from the secret triggers: a failure is the run's
            probed = _probed(triggers, scan.probes, scan.probes_only)
        except Exception as exc:  # noqa: BLE001
            answers.append((place, _run_failed(exc)))
            continue
        mask = probed.attention_mask
        kind = (scan.width, probed.inputs.shape[1:], probed.inputs.dtype.str,
                None if mask is None else (mask.shape[1:], mask.dtype.str))
        groups.setdefault(kind, []).append((place, (scan, probed)))
    for members in groups.values():
        scan = members[0][1][0]
        sets = [probed for _, (_, probed) in members]
        try:
            scanned: list[Any] = capture_every_sets(scan.model, sets, width=scan.width)
        except Exception as exc:  # noqa: BLE001 - the whole pass failed: every set with it
            scanned = [exc] * len(members)
        for (place, _), probed, found in zip(members, sets, scanned, strict=True):
            answers.append((place, _run_failed(found) if isinstance(found, BaseException)
                            else protocol.LayerScan.of(len(probed), found)))
    return answers


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
