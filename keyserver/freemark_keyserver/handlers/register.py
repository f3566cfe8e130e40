"""Register: an owner's key bundle and host model become a signed, logged registration.

The handler authorises on the header (the caller's role, the bundle and its binding to the
caller, the host's format) before it reads a byte of the upload, then receives the host and
any reference models. One sandbox child reads the host: it must be the model the key was
derived on (fingerprint, every bit extracted, the key specific to it); the same child then
scans it on the triggers of every earlier registration of its input signature, whatever its
modules are called, and an earlier registration that claims it refuses the call
(`_PriorClaims`); an output key's Register does the same, its child reading the host through
its answers to the queries (`register_output_key`). The reference panel is measured (the
owner's references and the operator's members of the family) and vetted (`vetting`: members
leaning toward the host left out, the rest able to reach alpha), the bundle and panel are
sealed, the host stored, the receipt (naming every member and its source) appended to the
log and signed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from freemark.blackbox.commit import query_set_commitments
from freemark.blackbox.key import OutputKey
from freemark.derive import check_uniqueness
from freemark.errors import InvalidInputError, UniquenessError
from freemark.extract import judge_activations
from freemark.formats.table import HOSTS, by_wire, names
from freemark.panel import Reference
from freemark.reading import aligns, probe_count
from freemark.records import wire
from freemark.records.types import (
    NO_PANEL,
    RECEIPT_KIND,
    PanelMemberEntry,
    Receipt,
    ReferencePanel,
)
from freemark.scheme.bundle import KeyBundle, from_proto
from freemark.scheme.triggers import TriggerSet
from freemark.scheme.watermark import commitment
from freemark.v1 import keyservice_pb2 as pb
from freemark.verdict.decision import suspect_vector
from freemark_keyserver import claims
from freemark_keyserver.auth import OWNER, require_role
from freemark_keyserver.crypto import seal
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers import outputs, panels
from freemark_keyserver.handlers.context import (
    Context,
    Stream,
    append_entry,
    inclusion_proof,
    public,
    sandbox_refusals,
    sandbox_runner,
    sign_statement,
)
from freemark_keyserver.handlers.hosts import store_host
from freemark_keyserver.handlers.lookups import lookup, lookup_many
from freemark_keyserver.handlers.scans import judge_tensor, scan_run
from freemark_keyserver.handlers.vetting import vet_panel
from freemark_keyserver.sandbox import formats
from freemark_keyserver.sandbox.runner import LayerScan, ModelIdentity, TriggerRun
from freemark_keyserver.store import ClaimSignature, DuplicateError, Principal, Registration

__all__ = ["CLAIMED", "parse_bundle", "register", "register_host", "register_output_key"]

log = logging.getLogger("freemark_keyserver")
REGISTRATION_ID_BYTES = 12
# What a Register's prior-claim check reads the host as: its activations or its answers.
HostReading = TypeVar("HostReading")
CLAIMED = ("an earlier registration already claims this model; if it is yours, use that "
           "registration, otherwise contact the key server's operator")


def register(ctx: Context, principal: Principal, stream: Stream[pb.RegisterHeader]
             ) -> pb.Receipt:
    """The Register call: authorise on its header, receive the host and the reference
    models (each checked before its bytes are read), then `register_host`."""
    require_role(principal, OWNER)
    header = stream.header()
    key: OutputKey | None = None
    bundle: KeyBundle | None = None
    if header.output_key:
        key = outputs.parse_key(header.output_key, principal.name, ctx.config.max_bundle_bytes)
        if header.upload.format != pb.MODEL_FORMAT_PT2:
            raise ServiceError(ErrorCode.MALFORMED_REQUEST, "an output key's host must be a "
                               ".pt2 program (the sandbox reads outputs from programs)")
    if header.HasField("bundle") or key is None:
        bundle = parse_bundle(ctx, principal, header)
    host_format = by_wire(header.upload.format)
    assert host_format is not None  # parse_bundle refuses any other
    with ExitStack() as files:
        host = files.enter_context(stream.receive(header.upload, suffix=host_format.suffix))
        references: list[Path] = []
        while (reference := stream.next_upload()) is not None:
            if len(references) == ctx.config.max_references:
                raise ServiceError(ErrorCode.TOO_LARGE, f"at most {ctx.config.max_references} "
                                   "reference models per registration")
            kind = panels.reference_format(reference, host_format)
            references.append(files.enter_context(stream.receive(reference, suffix=kind.suffix)))
        if bundle is None:
            assert key is not None
            return register_output_key(ctx, principal, key, host, references)
        return register_host(ctx, principal, bundle, host, references,
                             host_format=header.upload.format, output_key=key)


def register_output_key(ctx: Context, principal: Principal, key: OutputKey, host: Path,
                        references: Sequence[Path]) -> pb.Receipt:
    """Check, store and log a registration of an output key; return its signed receipt.

    The host is read in the sandbox through its outputs: it must be the key's host and
    answer every query as the key says. The same child then runs the prior-claim check of
    a white-box Register (`_PriorClaims`: registered weights, a match of any earlier key of
    either kind, fail closed), so a copy of a host registered under a white-box key cannot
    be registered under an output key either. The panel (the key's own references) is
    read in the sandbox too, and its answers, not the owner's, are sealed with the key. The
    receipt commits to every query set (`Receipt.query_sets`).
    """
    require_role(principal, OWNER)
    prior = _output_key_claims(ctx, principal, key)
    with sandbox_refusals():  # one child reads the host, then judges it against earlier keys
        _, results = ctx.batch(host, outputs.host_runs(key), limits=ctx.config.sandbox,
                               options={}, then=prior.runs)
    assert prior.host is not None  # `runs` ran, or the call raised
    prior.judge(results)
    reading = prior.host
    fingerprint = reading.identity.fingerprint
    panel, _ = outputs.measure_panel(ctx, references, key, reading)
    registration_id = "reg_" + secrets.token_hex(REGISTRATION_ID_BYTES)
    envelope = seal(ctx.keyring, outputs.seal_bytes(key, panel), record_id=registration_id,
                    owner=principal.name)
    host_header = store_host(ctx.store, ctx.keyring, host, registration_id=registration_id,
                             owner=principal.name)
    wm_commitment = commitment(key.bits)
    sets = query_set_commitments(key)
    record = Registration(
        registration_id=registration_id, owner=principal.name, created_at=0,
        host_fingerprint=fingerprint, architecture_digest=reading.identity.architecture_digest,
        layer=outputs.OUTPUTS_LAYER, units=key.n_classes, n_bits=len(key.queries),
        commitment=wm_commitment, key_version=ctx.keyring.current_version,
        envelope=envelope.to_bytes(), host_envelope=host_header, log_index=0,
    )
    try:
        body, index, _ = append_entry(ctx, RECEIPT_KIND, lambda i, t: wire.encode_body(Receipt, {
            "registration_id": registration_id, "owner": principal.name,
            "host_fingerprint": fingerprint, "watermark_commitment": wm_commitment,
            "layer": outputs.OUTPUTS_LAYER, "n_bits": len(key.queries), "log_index": i,
            "integrated_time": t, "panel": ReferencePanel.of(key.panel),
            "architecture_digest": reading.identity.architecture_digest, "query_sets": sets,
            "panel_members": tuple(PanelMemberEntry(fingerprint=f, source="owner", member_id="",
                                                    left_out="") for f in key.panel),
            "panel_warning": "",
        }), record)
    except DuplicateError as exc:  # a concurrent Register of the same host committed first
        raise _claimed(principal, lookup_many(
            ctx, lambda registry: registry.by_fingerprint(fingerprint)),
            "a concurrent Register of the same weights committed first") from exc
    log.info("registered output key %s for %s at log index %d (%d sets, panel of %d)",
             registration_id, principal.name, index, len(sets), len(key.panel))
    receipt = wire.read_statement(Receipt, sign_statement(ctx, body), inclusion_proof(ctx, index))
    return wire.receipt_to_proto(receipt)


def parse_bundle(ctx: Context, principal: Principal, header: pb.RegisterHeader) -> KeyBundle:
    """Validate the bundle in a Register header and its binding to the caller."""
    if header.bundle.ByteSize() > ctx.config.max_bundle_bytes:
        raise ServiceError(ErrorCode.TOO_LARGE,
                           f"key bundle over the cap of {ctx.config.max_bundle_bytes} bytes")
    try:
        bundle = from_proto(header.bundle)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_BUNDLE, str(exc)) from exc
    if bundle.owner != principal.name:
        raise ServiceError(ErrorCode.PERMISSION_DENIED,
                           f"the watermark is bound to owner {bundle.owner!r}, you are "
                           f"{principal.name!r}: derive the key with --owner {principal.name}")
    host_format = by_wire(header.upload.format)
    if host_format is None or not host_format.host:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"register the host as {names(HOSTS)}")
    return bundle


def register_host(ctx: Context, principal: Principal, bundle: KeyBundle, host: Path,
                  references: Sequence[Path] = (), *,
                  host_format: int = pb.MODEL_FORMAT_PT2,
                  output_key: OutputKey | None = None) -> pb.Receipt:
    """Check, store and log a registration; return its signed receipt.

    The host's probe profile is measured here, in the sandbox, and replaces the uploaded
    one; each reference is read the same way and refused if it is the host relabelled.

    With `output_key`, the registration holds both key kinds for one host: after the
    white-box checks the host is read through its outputs as for an output key alone
    (`outputs.read_host`), the references that are the output key's panel members become
    its measured panel and the others the white-box key's, the output key is sealed
    inside the registration's envelope and the receipt commits to its query sets.
    """
    require_role(principal, OWNER)
    claims = _white_box_claims(ctx, principal, bundle)
    with sandbox_refusals():  # one child reads the host, then judges it against earlier keys
        _, results = ctx.batch(host, [panels.trigger_run(bundle, probes=True)],
                               limits=ctx.config.sandbox,
                               options=formats.sandbox_options(host_format), then=claims.runs)
    assert claims.host is not None  # `runs` ran, or the call raised
    claims.judge(results)
    reading = claims.host
    bundle = panels.with_profile(bundle, reading)
    sealed_outputs = b""
    sets: tuple[bytes, ...] = ()
    if output_key is not None:  # the same host: both keys' fingerprint checks passed on it
        host_outputs = outputs.read_host(ctx, host, output_key)
        measured, references = outputs.measure_panel(ctx, references, output_key,
                                                     host_outputs, others=True)
        sealed_outputs = outputs.seal_bytes(output_key, measured)
        sets = query_set_commitments(output_key)
    candidates = panels.measure_panel(sandbox_runner(ctx), references, bundle, reading)
    skipped: list[PanelMemberEntry] = []
    if reading.probes is not None:
        operators, skipped = panels.operator_panel(sandbox_runner(ctx), ctx.store, ctx.keyring,
                                                   bundle, reading, candidates)
        candidates += operators
    vetted = vet_panel(candidates, bundle, reading, policy=ctx.config.verdict_policy,
                       mode=ctx.config.panel_reach, skipped=skipped)
    panel = vetted.references

    registration_id = "reg_" + secrets.token_hex(REGISTRATION_ID_BYTES)
    envelope = seal(ctx.keyring, panels.seal_bytes(bundle, panel, sealed_outputs),
                    record_id=registration_id, owner=principal.name)
    # Streamed from the upload's memory file into the store a segment at a time.
    host_header = store_host(ctx.store, ctx.keyring, host, registration_id=registration_id,
                             owner=principal.name)
    wm_commitment = commitment(bundle.bits)
    record = Registration(
        registration_id=registration_id, owner=principal.name, created_at=0,
        host_fingerprint=reading.fingerprint, architecture_digest=reading.architecture_digest,
        layer=bundle.layer, units=bundle.units, n_bits=bundle.n_bits, commitment=wm_commitment,
        key_version=ctx.keyring.current_version, envelope=envelope.to_bytes(),
        host_envelope=host_header, log_index=0,
    )
    panel_record = ReferencePanel.of([r.fingerprint for r in panel]) if panel else NO_PANEL
    try:
        body, index, _ = append_entry(ctx, RECEIPT_KIND, lambda i, t: wire.encode_body(Receipt, {
            "registration_id": registration_id, "owner": principal.name,
            "host_fingerprint": reading.fingerprint, "watermark_commitment": wm_commitment,
            "layer": bundle.layer, "n_bits": bundle.n_bits, "log_index": i, "integrated_time": t,
            "panel": panel_record, "architecture_digest": reading.architecture_digest,
            "panel_members": vetted.entries, "panel_warning": vetted.warning, "query_sets": sets,
        }), record, claim=claims.sealed(registration_id))
    except DuplicateError as exc:  # a concurrent Register of the same host committed first
        raise _claimed(principal, lookup_many(
            ctx, lambda registry: registry.by_fingerprint(reading.fingerprint)),
            "a concurrent Register of the same weights committed first") from exc
    log.info("registered %s for %s at log index %d (panel of %d%s)", registration_id,
             principal.name, index, len(panel), "; too weak to reach alpha, warned"
             if vetted.warning else "")
    receipt = wire.read_statement(Receipt, sign_statement(ctx, body), inclusion_proof(ctx, index))
    return wire.receipt_to_proto(receipt)


class _PriorClaims(Generic[HostReading]):
    """ALREADY_EXISTS when an earlier registration (`_blocks`) already claims the upload.

    Either key kind's Register runs it, in the child that reads the host with the key
    being registered (`_white_box_claims`: its activations on the triggers, which also give
    the upload's own claim signature; `_output_key_claims`: its answers to the queries), and
    the claims are the same for both: every earlier registration's keys of both kinds.

    Claimed means: the same weights, or an earlier key's verdict (plain and, with that
    registration's panel, aligned, so a relabelled, rescaled or padded copy is caught) is a
    match on some tensor of the upload, or an earlier output key's verdict on the upload's
    answers to its queries is a match (`outputs.claimed_by`; every candidate holding an
    output key, read in the same child: `_output_keys`, `_output_claims`). The key layer
    is located by the TTP, not by its name: the sandbox child reads every tensor the upload computes on that registration's
    triggers (a scan, `TriggerRun` with no layer), of the key's width for the plain test or
    of any width when the panel lets the aligned test run, and each is judged with the
    earlier key; any match is a claim. So renaming the key layer, any weight, every module,
    wrapping a layer in a container or inlining it changes nothing. The refusal names
    neither the earlier registration nor any figure: a number here would let a thief steer
    his laundering one query at a time.

    Which earlier registrations get that full check (issue 21): the claim index
    (`freemark_keyserver.claims`) holds every registration's signature (its key layer's
    probe-similarity structure, blind to relabelling, rescaling and padding). The upload is
    scanned on each input group's probes, every tensor's signature is compared with the
    group's, and the nearest registrations (`ServerConfig.claim_candidates`, the
    operator's `--claim-candidates`) are candidates, with every registration the index
    cannot rank (made before the index, or whose signature could not be read): those are
    always candidates. A candidate must still take the upload's input kind (`_signature`,
    read from its sealed bundle). The candidates' scans share one forward pass in the child
    (`sandbox.worker`), so a Register costs about one scan and a judgement per candidate
    whatever the registry's size. The index's answer decides nothing and is never shown: it
    only chooses which secret keys judge the upload.

    All in the sandbox child that read the upload with its own key (`runs` is the pool's
    follow-up, asked three times: the index scans, then the candidates' scans, then
    nothing): one load in all.

    Fail closed: a scan that cannot be completed (the model fails on those triggers or the
    index's probes, a deadline, a resource limit or cap, a crash) is a claim, refused with
    the same fixed ALREADY_EXISTS as any claim, so a thief cannot buy a clearance by making
    his copy fail on other owners' triggers, and the answer says nothing about the failure.
    An upload that does not take inputs of that registration's kind at all (its declared
    input shape differs), or that computes no tensor the key can be read on, is not a copy
    of it: no claim. A tensor the key cannot be read on (a constant one, too few live units
    to align) is skipped; the others still decide. Only the caller's own cancellation ends
    the call.
    """

    def __init__(self, ctx: Context, principal: Principal, kind: tuple[int, bool, bool],
                 read_host: Callable[[ModelIdentity, Sequence[np.ndarray | Exception]],
                                     tuple[HostReading, bytes]],
                 own: KeyBundle | None = None) -> None:
        """`kind`: the inputs the upload takes (`claims.input_kind`); `read_host`: the host's
        reading, checked against the key being registered, and its fingerprint, from the
        child's first results; `own`: the white-box key being registered, whose layer gives
        the upload's own claim signature (an output key's registration has none)."""
        self.ctx, self.principal, self.kind, self.bundle = ctx, principal, kind, own
        self._read_host = read_host
        self.host: HostReading | None = None
        self.initial = 0  # the child's first results (the host's own runs), before ours
        self.earlier: list[tuple[Registration, KeyBundle, list[Reference]]] = []
        self.groups: list[tuple[bytes, str]] = []  # the index groups scanned, with anchors
        self.own: tuple[bytes, str] | None = (claims.group_of(own.triggers), "") \
            if own is not None else None
        self.vector: np.ndarray | None = None  # the upload's own signature, once read
        self.output_keys: list[tuple[Registration, OutputKey, outputs.MeasuredPanel]] = []
        self.index_failed = False
        self.asked = 0

    def runs(self, identity: ModelIdentity, results: list[np.ndarray | Exception]) -> list[TriggerRun]:
        """The pool's follow-up, asked until it returns nothing: first the index's scans,
        then a full scan for every candidate earlier key (at once when there is nothing
        to scan for the index: the pool would stop asking on an empty answer)."""
        self.asked += 1
        if self.asked == 1:
            index = self._index_runs(identity, results)
            if index:
                return index
            self.asked += 1
        if self.asked == 2:
            return self._candidate_runs(results[self.initial:])
        return []

    def _index_runs(self, identity: ModelIdentity, results: list[np.ndarray | Exception]
                    ) -> list[TriggerRun]:
        """With the host's own reading (its child still holds it): check the host, refuse an
        upload of registered weights, and return a scan of every tensor on each index
        group's probes for the upload's input kind, and (a white-box key) a read of its own
        key layer on its group's probes (its signature, stored with the registration)."""
        self.initial = len(results)
        self.host, fingerprint = self._read_host(identity, results)
        same = [r for r in lookup_many(self.ctx, lambda reg: reg.by_fingerprint(fingerprint))
                if _blocks(r, self.principal)]
        if same:
            raise _claimed(self.principal, same, "the same weights are registered")
        self.ctx.claims.refresh(self.ctx.store)
        anchors: dict[str, TriggerSet] = {}
        for group, anchor in self.ctx.claims.groups(self.kind):
            record = lookup(self.ctx, anchor)
            if record is None:  # a row the signed log does not hold: no group of ours
                continue
            anchors[anchor] = panels.open_sealed(self.ctx, record)[0].triggers
            self.groups.append((group, anchor))
        scans = [TriggerRun(None, 0, anchors[anchor], claims.PROBES, probes_only=True)
                 for _, anchor in self.groups]
        if self.bundle is None or self.own is None:
            return scans
        own_group = self.own[0]
        own_anchor = self.ctx.claims.anchor(own_group) or ""
        self.own = (own_group, own_anchor)
        own_triggers = anchors.get(own_anchor, self.bundle.triggers)
        return [*scans,
                TriggerRun(self.bundle.layer, self.bundle.pooling, own_triggers, claims.PROBES,
                           probes_only=True)]

    def _candidate_runs(self, results: Sequence[np.ndarray | Exception]) -> list[TriggerRun]:
        """The candidates the index ranks nearest, with every registration it cannot rank;
        a scan for each of those whose triggers the upload could take."""
        own = results[len(self.groups)] if self.own is not None else None
        if isinstance(own, np.ndarray):
            self.vector = claims.signature(claims.probe_rows(own))
        # Stored without one (a white-box key's signature unread): every later Register
        # checks it in full. An output key's registration has none to read.
        if self.vector is None and self.own is not None:
            log.warning("Register by %s: the upload's own claim signature could not be read; "
                        "it will be checked in full by every later Register of its kind",
                        self.principal.name)
        wanted: dict[str, None] = {}
        for (group, _), scan in zip(self.groups, results, strict=False):
            vectors: list[np.ndarray] = []
            if isinstance(scan, LayerScan):
                vectors = [v for v in (claims.signature(claims.probe_rows(layer))
                                       for layer in scan.layers()) if v is not None]
            else:  # the index cannot rank it: a claim
                log.warning("Register by %s: the upload could not be scanned on the claim "
                            "index's probes (%s); a claim", self.principal.name,
                            _failure_name(scan) if isinstance(scan, BaseException)
                            else "not a scan")
                self.index_failed = True
            # As many candidates either way: the number of full checks (and so the call's
            # time) says nothing of how the upload ran on the anchor's triggers.
            wanted.update(dict.fromkeys(self.ctx.claims.nearest(
                group, vectors, self.ctx.config.claim_candidates)))
        index = self.ctx.claims
        wanted.update(dict.fromkeys(s.registration_id for s in self.ctx.ledger.read(
            self.ctx.store, lambda reg: reg.all()) if not index.indexed(s.registration_id)))
        found = [r for r in (lookup(self.ctx, rid) for rid in wanted)
                 if r is not None and _blocks(r, self.principal)]
        opened = [(record, *panels.open_sealed(self.ctx, record)) for record in found
                  if not outputs.is_output_registration(record)]
        self.earlier = [(record, bundle, panel) for record, bundle, panel in opened
                        if _signature(bundle.triggers) == self.kind]
        # Output keys read answers, not tensors: each candidate holding one (an output key
        # alone is never indexed, so always a candidate) reads the upload's answers to its
        # queries in this child too (`outputs.claim_runs`).
        self.output_keys = _output_keys(self.ctx, found)
        return [*(scan_run(bundle, panel) for _, bundle, panel in self.earlier),
                *(run for _, key, _ in self.output_keys for run in outputs.claim_runs(key))]

    def sealed(self, registration_id: str) -> ClaimSignature | None:
        """The upload's own signature, sealed for the index (None when it could not be read:
        the registration is then one the index cannot rank, checked in full by later ones)."""
        if self.vector is None or self.own is None:
            return None
        group, anchor = self.own
        return claims.sealed_claim(self.ctx.keyring, registration_id, self.principal.name,
                                   group, anchor or registration_id, self.vector)

    def judge(self, results: Sequence[np.ndarray | Exception]) -> None:
        """Refuse the upload if an earlier key decodes any tensor of it, or if a scan or a
        judgement failed (fail closed: never a clearance).

        `results` are the child's: the host's own runs, the index's scans (and the
        upload's own signature run), then the candidates'.
        Every candidate key is judged before any refusal (no short-circuit: how long the call
        takes says nothing of which key matched). A failure is logged by its class name only:
        its message may be computed from that key's secret triggers (issue 18)."""
        assert self.host is not None
        results = results[self.initial + len(self.groups) + (self.own is not None):]
        claims_found: list[tuple[Registration, float]] = []
        claims_found += _output_claims(self.output_keys, results[len(self.earlier):])
        for (record, bundle, panel), result in zip(self.earlier, results):
            if not isinstance(result, LayerScan):  # a failed scan: never a clearance
                log.warning("Register by %s: the upload could not be scanned with earlier "
                            "registration %s (%s); a claim", self.principal.name,
                            record.registration_id, _failure_name(result)
                            if isinstance(result, BaseException) else "not a scan")
                claims_found.append((record, 0.0))
                continue
            probes = probe_count(bundle, probes=aligns(bundle, panel))
            for layer in result.layers():
                try:
                    verdict = judge_tensor(layer, bundle, panel, probes)
                except InvalidInputError:  # a tensor this key cannot be read on
                    continue
                except Exception as exc:  # noqa: BLE001 - a failed judgement is a claim
                    log.warning("Register by %s: a tensor of the upload could not be judged "
                                "with earlier registration %s (%s); a claim",
                                self.principal.name, record.registration_id, _failure_name(exc))
                    claims_found.append((record, 0.0))
                    break
                if verdict.is_match:
                    claims_found.append((record, verdict.log10_p_value))
                    break
        if claims_found:
            raise _claimed(self.principal, [record for record, _ in claims_found],
                           "an earlier key decodes the upload, or it could not be judged "
                           "(log10 p " + ", ".join(f"{p:.1f}" for _, p in claims_found) + ")")
        if self.index_failed:
            raise _claimed(self.principal, [], "the upload could not be read on the claim "
                           "index's probes")


def _white_box_claims(ctx: Context, principal: Principal, bundle: KeyBundle
                      ) -> _PriorClaims[panels.Reading]:
    """The prior-claim check of a white-box Register: the host read on the key's triggers
    (and probes) must be the key's host (`_check_host`)."""

    def read(identity: ModelIdentity, results: Sequence[np.ndarray | Exception]
             ) -> tuple[panels.Reading, bytes]:
        try:
            host = panels.reading_of(bundle, identity, results[0], bundle.probes)
        except InvalidInputError as exc:
            raise ServiceError(ErrorCode.INVALID_MODEL, public(exc)) from exc
        _check_host(bundle, host)
        return host, host.fingerprint

    return _PriorClaims(ctx, principal, _signature(bundle.triggers), read, own=bundle)


def _output_key_claims(ctx: Context, principal: Principal, key: OutputKey
                       ) -> _PriorClaims[outputs.Reading]:
    """The prior-claim check of an output-key Register: the host read through its answers
    (`outputs.host_runs`) must be the key's host (`outputs.check_host`)."""

    def read(identity: ModelIdentity, results: Sequence[np.ndarray | Exception]
             ) -> tuple[outputs.Reading, bytes]:
        host = outputs.reading_of(key, identity, results, "the host")
        outputs.check_host(key, host)
        return host, host.identity.fingerprint

    return _PriorClaims(ctx, principal, claims.kind_of_inputs(key.queries), read)


def _output_keys(ctx: Context, records: Sequence[Registration]
                 ) -> list[tuple[Registration, OutputKey, outputs.MeasuredPanel]]:
    """The output keys `records` hold (alone or beside a white-box key), opened."""
    found = []
    for record in records:
        sealed = panels.open_output_key(ctx, record)
        if sealed is not None:
            found.append((record, *sealed))
    return found


def _output_claims(keys: Sequence[tuple[Registration, OutputKey, outputs.MeasuredPanel]],
                   answers: Sequence[np.ndarray | Exception]
                   ) -> list[tuple[Registration, float]]:
    """The earlier output keys that claim the upload, from its answers to their
    `outputs.claim_runs` (two per key, in order): a match, or a failed run (fail closed).
    Every key is judged (no short-circuit)."""
    if len(answers) != 2 * len(keys):
        raise ServiceError(ErrorCode.INTERNAL, "the sandbox answered a prior-claim check with "
                           "the wrong number of runs")
    found = []
    for number, (record, key, panel) in enumerate(keys):
        log10_p = outputs.claimed_by(key, panel, answers[2 * number:2 * number + 2])
        if log10_p is not None:
            found.append((record, log10_p))
    return found


def _failure_name(exc: BaseException) -> str:
    """What the operator's log says of a failed prior-claim run: class names, no message."""
    error_type = getattr(exc, "error_type", None)  # SandboxRunFailed: what the model raised
    return f"{type(exc).__name__}: {error_type}" if error_type else type(exc).__name__


def _signature(triggers: TriggerSet) -> tuple[int, bool, bool]:
    """What an upload must take to be read on these triggers (`claims.input_kind`)."""
    return claims.input_kind(triggers)


def _claimed(principal: Principal, records: Sequence[Registration], why: str) -> ServiceError:
    """The ALREADY_EXISTS refusal, logged for the operator with the caller and the claim.

    An owner is told his own registration's id; anybody else only that a claim exists (no
    id, no figure). The log line (timestamped by the server's log format) is the operator's
    record of who tried, and against which registration.
    """
    claims = ", ".join(r.registration_id for r in records)
    log.warning("Register by %s refused: %s (claimed by %s)", principal.name, why, claims)
    own = [r.registration_id for r in records if r.revoked_at is None and r.owner == principal.name]
    if own:
        return ServiceError(ErrorCode.ALREADY_CLAIMED,
                            f"this model is already registered as {own[0]}, by you")
    return ServiceError(ErrorCode.ALREADY_CLAIMED, CLAIMED)


def _blocks(record: Registration, principal: Principal) -> bool:
    """Whether an earlier registration stands in the way of `principal`'s new one.

    An active one always does. A revoked one keeps its place and its priority date in the
    log, so it still blocks everyone but its own owner (who may register the model again,
    with a new key): revoking must never turn a model into one anyone can claim as new.
    """
    return record.revoked_at is None or record.owner != principal.name


def _check_host(bundle: KeyBundle, reading: panels.Reading) -> None:
    """The upload is the host the key was derived on, and the key is specific to it."""
    if reading.fingerprint != bundle.host_fingerprint:
        raise ServiceError(ErrorCode.HOST_MISMATCH,
                           "the uploaded model's weights are not the ones the key was derived on "
                           "(host fingerprint differs)")
    verdict = judge_activations(reading.triggers, bundle)
    if verdict.matches != bundle.n_bits:
        raise ServiceError(ErrorCode.HOST_MISMATCH,
                           f"the key extracts {verdict.matches}/{bundle.n_bits} bits from the host; "
                           "it must extract all of them")
    try:
        check_uniqueness(bundle.key.astype(np.float64), bundle.bits,
                         suspect_vector(reading.triggers, centred=bundle.centred))
    except UniquenessError as exc:
        raise ServiceError(ErrorCode.NOT_UNIQUE, str(exc)) from exc
