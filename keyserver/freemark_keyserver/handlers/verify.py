"""Verify: judge a suspect model against a registration, and sign and log the verdict.

The handler authorises on the header (`verify_target`: the caller's role, the registration
visible to the caller and not revoked, the suspect's format, alpha within the verdict
policy), has the registration's rate limit looked at (`admit.check`), receives the suspect,
and has the limit charged only then (`admit.charge`: an abandoned upload costs the
registration nothing). The sandbox reads it on the registration's triggers (and alignment probes where the
registration's panel lets the aligned test run); bare `.safetensors` weights are read into
the registered host's program, a GGUF file into the registered checkpoint's architecture. An ONNX graph's node names are its author's, so the key
server locates its key layer itself: it scans every candidate tensor and the verdict is the
strongest, corrected for how many there were (`scans.judge_scan`; a tensor the requester
names is one more candidate, never the only one). The verdict binds the suspect, the
requester, what was read from the suspect and how it was located, and the policy.

Output keys judge files too (issue 19): a registration of an output key alone reads a .pt2
suspect's answers to every query set in the sandbox (`outputs.suspect_tests`; the reading
is `(outputs)`), and one that holds an output key beside its white-box key adds those tests
to the white-box verdict under the same Bonferroni correction (`judge_activations`'
`extra`); where the suspect is not a .pt2 program the verdict says the output key was not
tested.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from freemark.errors import InvalidInputError
from freemark.extract import judge_activations
from freemark.formats.table import SUSPECTS, by_wire, names
from freemark.panel import Reference
from freemark.reading import aligns
from freemark.records import wire
from freemark.records.types import CoarseVerdict, SignedVerdict, SuspectReading, Verdict
from freemark.scheme.bundle import KeyBundle
from freemark.v1 import keyservice_pb2 as pb
from freemark.verdict.decision import DEFAULT_ALPHA
from freemark.verdict.outputs import OutputTest, decide_outputs
from freemark_keyserver.auth import ADMIN, ARBITER, OWNER, require_role
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers import outputs, panels, scans
from freemark_keyserver.handlers.context import (
    Admission,
    Context,
    Stream,
    append_entry,
    disclosed,
    inclusion_proof,
    policy_alpha,
    sandbox_refusals,
    sandbox_runner,
    sign_statement,
)
from freemark_keyserver.handlers.hosts import host_file
from freemark_keyserver.handlers.lookups import visible
from freemark_keyserver.sandbox import formats
from freemark_keyserver.sandbox.protocol import SKIP_FINGERPRINT
from freemark_keyserver.sandbox.runner import LayerScan
from freemark_keyserver.store import Principal, Registration

__all__ = ["Admission", "judge", "verify", "verify_target"]

log = logging.getLogger("freemark_keyserver")


def verify(ctx: Context, principal: Principal, stream: Stream[pb.VerifyHeader], *,
           admit: Admission) -> pb.SignedVerdict:
    """The Verify call: authorise on its header, `admit.check` the registration's rate limit
    (refused before the upload is read when it would be refused after), receive the suspect,
    `admit.charge` (only a completed upload costs the registration's bucket: header-only or
    abandoned calls cannot drain it) and `judge` it."""
    header = stream.header()
    record = verify_target(ctx, principal, header)
    admit.check(record)
    suspect_format = by_wire(header.upload.format)
    assert suspect_format is not None  # verify_target refuses any other
    with stream.receive(header.upload, suffix=suspect_format.suffix) as suspect:
        admit.charge(record)
        return judge(ctx, principal, record, header, suspect, settle=stream.settle)


def verify_target(ctx: Context, principal: Principal, header: pb.VerifyHeader) -> Registration:
    """Authorise a Verify before its upload is read."""
    require_role(principal, OWNER, ARBITER, ADMIN)
    record = visible(ctx, principal, header.registration_id)
    if record.revoked_at is not None:
        raise ServiceError(ErrorCode.REVOKED,
                           f"registration {record.registration_id} was revoked; it proves nothing")
    suspect_format = by_wire(header.upload.format)
    if suspect_format is None or not suspect_format.suspect:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"the suspect must be {names(SUSPECTS)}")
    if header.onnx_tensor and header.upload.format != pb.MODEL_FORMAT_ONNX:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "onnx_tensor is for ONNX suspects only")
    if len(header.onnx_tensor) > formats.MAX_TENSOR_NAME:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"onnx_tensor is over {formats.MAX_TENSOR_NAME} characters")
    if outputs.is_output_registration(record) and header.upload.format != pb.MODEL_FORMAT_PT2:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"registration {record.registration_id} holds an output key, read "
                           "from a model's answers: upload the suspect as a .pt2 program, or "
                           "judge its live endpoint with freemark verify --endpoint")
    policy_alpha(ctx, header.alpha)
    return record


def judge(ctx: Context, principal: Principal, record: Registration, header: pb.VerifyHeader,
          suspect: Path, *, settle: Callable[[], None] = lambda: None) -> pb.SignedVerdict:
    """Judge the uploaded suspect against a registration; return the signed, logged verdict.

    The verdict binds the suspect (SHA-256 and size, both checked against the bytes
    received, or measured on the sealed copy of a file named under the model root, whose
    hash runs beside the sandbox: `settle` waits for it just before it is bound), the
    requester and the policy. A requester other than the registration's
    owner gets a coarse verdict when the policy says so; the owner always gets the full one.
    """
    alpha = header.alpha or DEFAULT_ALPHA
    if outputs.is_output_registration(record):
        key, measured = outputs.open_sealed(ctx, record)
        try:
            tests = outputs.suspect_tests(ctx, suspect, key, measured)
        except InvalidInputError as exc:
            raise ServiceError(ErrorCode.INVALID_MODEL, str(exc)) from exc
        verdict = decide_outputs(tests, key.panel, alpha=alpha)
        read = SuspectReading.named(outputs.OUTPUTS_LAYER)
    else:
        bundle, panel = panels.open_sealed(ctx, record)
        extra, extra_panel, note = _output_tests(ctx, header, record, suspect)
        if header.upload.format == pb.MODEL_FORMAT_ONNX:
            verdict, read = _scanned(ctx, header, suspect, bundle, panel, alpha=alpha)
        else:
            verdict, read = _named(ctx, header, record, suspect, bundle, panel, alpha=alpha,
                                   extra=extra, extra_panel=extra_panel)
        if note:
            verdict = dataclasses.replace(verdict,
                                          p_value_method=f"{verdict.p_value_method}; {note}")
    policy = ctx.config.verdict_policy
    settle()  # the suspect's SHA-256 is in its header from here on
    coarse, judgement = disclosed(ctx, principal.name, record, verdict)
    verdict_type: type[SignedVerdict | CoarseVerdict] = (CoarseVerdict if coarse
                                                              else SignedVerdict)
    binding = {"registration_id": record.registration_id, "requested_by": principal.name,
               "suspect_sha256": header.upload.sha256, "suspect_size": header.upload.total_size,
               "policy": policy, "reading": read}
    body, index, _ = append_entry(ctx, verdict_type.KIND, lambda i, t: wire.encode_body(verdict_type, {
        **judgement, **binding, "log_index": i, "integrated_time": t}))
    log.info("verdict on %s by %s: %s (log10 p %.1f, %s; read %s of %d) at log index %d",
             record.registration_id, principal.name, verdict.outcome, verdict.log10_p_value,
             "coarse" if coarse else "full", read.located, read.candidates, index)
    signed = wire.read_statement(verdict_type, sign_statement(ctx, body), inclusion_proof(ctx, index))
    return wire.verdict_to_proto(signed)


def _named(ctx: Context, header: pb.VerifyHeader, record: Registration, suspect: Path,
           bundle: KeyBundle, panel: Sequence[Reference], *, alpha: float,
           extra: Sequence[OutputTest] = (), extra_panel: Sequence[bytes] = ()
           ) -> tuple[Verdict, SuspectReading]:
    """A suspect read at the registered layer by its module name: a Hugging Face checkpoint
    (names fixed by its allow-listed architecture), bare weights (read into the registered
    host's program), a GGUF (read into the registered checkpoint's architecture, which it
    must match) or a program. `extra`: the output key's tests of the same suspect,
    combined with the white-box tests (`judge_activations`)."""
    probes = aligns(bundle, panel)  # without an aligned test the probes would go unused
    if header.upload.format in formats.INTO_HOST:
        with host_file(ctx.store, ctx.keyring, record) as host:
            into = formats.into_host_options(header.upload.format, host)
            if into is None:
                raise ServiceError(ErrorCode.INVALID_MODEL,
                                   "a GGUF suspect is read into the registered host's "
                                   "architecture, and this registration's host is a .pt2 "
                                   "program, not a Hugging Face checkpoint")
            reading = panels.read(sandbox_runner(ctx, {**into, **SKIP_FINGERPRINT}), host,
                                  bundle, suspect, probes=probes)
    else:
        options = {**formats.sandbox_options(header.upload.format), **SKIP_FINGERPRINT}
        reading = panels.read(sandbox_runner(ctx, options), suspect, bundle, probes=probes)
    try:
        verdict = judge_activations(reading.triggers, bundle, alpha=alpha,
                                    probe_activations=reading.probes, panel=panel,
                                    extra=extra, extra_panel=extra_panel)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, str(exc)) from exc
    return verdict, SuspectReading.named(bundle.layer)


def _output_tests(ctx: Context, header: pb.VerifyHeader, record: Registration, suspect: Path
                  ) -> tuple[list[OutputTest], list[bytes], str]:
    """(tests, the fingerprints of their null's panel, a note for the verdict) of the output
    key a registration holds beside its white-box key, on a .pt2 suspect; none, with a note
    saying why, where the suspect's outputs cannot be read with it."""
    attached = panels.open_output_key(ctx, record)
    if attached is None:
        return [], [], ""
    key, measured = attached
    if header.upload.format != pb.MODEL_FORMAT_PT2:
        return [], [], "the output key was not tested: its queries are read from .pt2 programs"
    try:
        return outputs.suspect_tests(ctx, suspect, key, measured), list(key.panel), ""
    except InvalidInputError as exc:
        return [], [], f"the output key was not tested: {exc}"


def _scanned(ctx: Context, header: pb.VerifyHeader, suspect: Path, bundle: KeyBundle,
             panel: Sequence[Reference], *, alpha: float) -> tuple[Verdict, SuspectReading]:
    """An ONNX suspect, whose node names are its author's: the key server locates the key
    layer by scanning every candidate tensor in the sandbox and judging each
    (`scans.judge_scan`); the tensor the requester named is one more candidate."""
    options = {**formats.sandbox_options(header.upload.format, header.onnx_tensor),
               **SKIP_FINGERPRINT}
    with sandbox_refusals():
        _, results = ctx.batch(suspect, [scans.scan_run(bundle, panel)],
                               limits=ctx.config.sandbox, options=options)
        if isinstance(results[0], Exception):
            raise results[0]
    scan = results[0]
    if not isinstance(scan, LayerScan):
        raise ServiceError(ErrorCode.INTERNAL, "the sandbox answered a scan with no tensors")
    return scans.judge_scan(scan, bundle, panel, alpha=alpha, requested=header.onnx_tensor,
                            max_candidates=ctx.config.max_scan_candidates)
