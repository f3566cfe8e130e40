"""The TTP's business logic, free of gRPC plumbing: plain methods that take parsed requests,
the authenticated principal and the spooled upload, and return response messages.

Register: re-extract from the host in the sandbox (must match exactly, fingerprint included),
run the null panel, refuse a host an earlier registration already claims, encrypt, log, sign.
Verify: run the suspect in the sandbox on the stored triggers, judge, log, sign.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from freemark.audit.registry import LogRegistry, RegistrationState
from freemark.derive import check_uniqueness
from freemark.errors import InvalidInputError, ModelFileError, UniquenessError
from freemark.extract import aligns, judge_activations
from freemark.formats.table import HOSTS, SUSPECTS, by_wire, names
from freemark.panel import Reference
from freemark.records import wire
from freemark.records.types import (
    NO_PANEL,
    RECEIPT_KIND,
    REVOCATION_KIND,
    Checkpoint,
    CoarseVerdict,
    ConsistencyProof,
    InclusionProof,
    Receipt,
    ReferencePanel,
    RegistrationInfo,
    Revocation,
    SignedStatement,
    SignedVerdict,
)
from freemark.scheme.bundle import KeyBundle, from_proto
from freemark.scheme.watermark import commitment
from freemark.tlog import merkle
from freemark.tlog.note import verifier_key
from freemark.v1 import keyservice_pb2 as pb
from freemark.verdict.decision import DEFAULT_ALPHA, coarse_values, suspect_vector
from freemark_keyserver import cancellation
from freemark_keyserver.auth import ADMIN, ARBITER, OWNER, require_role
from freemark_keyserver.handlers import panels
from freemark_keyserver.sandbox import formats

__all__ = ["ADMIN", "ARBITER", "OWNER", "Context", "require_role"]
from freemark_keyserver.config import ServerConfig
from freemark_keyserver.crypto import Envelope, MasterKeyring, SigningKey, open_envelope, seal
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.hosts import host_file, store_host
from freemark_keyserver.sandbox.protocol import SKIP_FINGERPRINT
from freemark_keyserver.sandbox.runner import (
    SandboxBusy,
    SandboxError,
    SandboxPool,
    SandboxResourceError,
    SandboxResult,
    SandboxTimeout,
    TriggerRun,
    run_batch,
    run_model,
)
from freemark_keyserver.store import (
    DuplicateError,
    PanelMember,
    Principal,
    Registration,
    Store,
    StoredCheckpoint,
)
from freemark_keyserver.tlog.ledger import DECIDING_COLUMNS, Ledger

log = logging.getLogger("freemark_keyserver")
MAX_PAGE = 100
MAX_REASON_CHARS = 1024  # a revocation's reason, signed into the log
# Log entries per GetEntries reply: a few hundred kilobytes, far under gRPC's 4 MiB message cap.
MAX_ENTRIES_PAGE = 256
DEFAULT_PAGE = 20
REGISTRATION_ID_BYTES = 12
CLAIMED = ("an earlier registration already claims this model; if it is yours, use that "
           "registration, otherwise contact the key server's operator")


@dataclass
class Context:
    """What every handler needs; built once by the server."""

    config: ServerConfig
    store: Store
    keyring: MasterKeyring
    signer: SigningKey
    pool: SandboxPool | None = None  # None: the process-wide `sandbox.shared_pool`
    sandbox: Callable[..., SandboxResult] = run_model
    batch: Callable[..., tuple[bytes, list[np.ndarray | Exception]]] = run_batch
    ledger: Ledger = field(default_factory=Ledger)  # the log's registrations: what decides

    def __post_init__(self) -> None:
        if self.pool is not None:
            self.sandbox = functools.partial(run_model, pool=self.pool)
            self.batch = functools.partial(run_batch, pool=self.pool)

    def close(self) -> None:
        """Close the store, then stop the sandbox pool (its fork server kills any child)."""
        self.store.close()
        if self.pool is not None:
            self.pool.close()


def _sandboxed(ctx: Context, model: Path, bundle: KeyBundle, weights: Path | None = None,
               options: dict[str, Any] | None = None, probes: int = 0) -> SandboxResult:
    """Run an untrusted model in the sandbox on the bundle's triggers and `probes` of its
    alignment probes (built in the child), mapping its failures to statuses.

    `options` name a format other than `.pt2` (`formats.sandbox_options`)."""
    extra = {"options": options} if options else {}
    with _sandbox_refusals():
        return ctx.sandbox(model, layer=bundle.layer, pooling=bundle.pooling,
                           triggers=bundle.triggers, probes=probes, weights_path=weights,
                           limits=ctx.config.sandbox, **extra)


@contextlib.contextmanager
def _sandbox_refusals() -> Iterator[None]:
    """The status of each way a sandbox run can fail (the model's fault or the sandbox's)."""
    try:
        yield
    except ModelFileError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, _public(exc)) from exc
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, _public(exc)) from exc
    except SandboxTimeout as exc:
        raise ServiceError(ErrorCode.SANDBOX_DEADLINE, str(exc)) from exc
    except SandboxResourceError as exc:
        raise ServiceError(ErrorCode.SANDBOX_LIMIT, str(exc)) from exc
    except SandboxBusy as exc:
        raise ServiceError(ErrorCode.SANDBOX_BUSY, str(exc), retry_after=exc.retry_after) from exc
    except SandboxError as exc:
        raise ServiceError(ErrorCode.SANDBOX_CRASHED, str(exc)) from exc


def _public(exc: Exception) -> str:
    """A model error's message without server paths (they name spool files)."""
    text = str(exc)
    if ": refused: " in text:
        return "refused: " + text.split(": refused: ", 1)[1]
    return text.replace(tempfile.gettempdir(), "<tmp>")


# --- log and signatures -------------------------------------------------------------------


def _append(ctx: Context, kind: str, build: Callable[[int, int], bytes],
            registration: Registration | None = None) -> tuple[bytes, int, int]:
    """Append one signed statement; `build(log index, integrated time)` is its body.

    Returns (body, log index, integrated time).
    """
    cancellation.check_active()  # a caller who has gone gets nothing signed or logged
    entry = ctx.store.append(kind, build, registration)
    return entry.entry, entry.index, entry.created_at


def _statement(ctx: Context, body: bytes) -> SignedStatement:
    return SignedStatement(body=body, signature=ctx.signer.sign(body), key_id=ctx.signer.key_id)


def _checkpoint(ctx: Context, size: int | None = None) -> Checkpoint:
    """Sign the tree head of the first `size` entries (default: all) and store it.

    The timestamp is the last entry's integrated time, so every replica signs the same
    checkpoint for the same size and timestamps never go backwards.
    """
    size = ctx.store.tree_size() if size is None else size
    stored = ctx.store.checkpoint_at(size)
    if stored is None:
        leaves = ctx.store.leaf_hashes(size)
        last = ctx.store.entries(size - 1, size)[0].created_at // 1_000_000 if size else 0
        checkpoint = merkle.Checkpoint(origin=ctx.config.origin, tree_size=size,
                                       root_hash=merkle.root(leaves), timestamp=last)
        signed = merkle.sign_checkpoint(ctx.signer, checkpoint)
        ctx.store.add_checkpoint(StoredCheckpoint(size, signed.note))
        stored = ctx.store.checkpoint_at(size)
        assert stored is not None
    return wire.checkpoint_from_note(stored.note)


def publish_checkpoint(ctx: Context, size: int | None = None) -> pb.SignedCheckpoint:
    """The signed checkpoint of the first `size` entries (default: all), as the reply."""
    return wire.checkpoint_to_proto(_checkpoint(ctx, size))


def _inclusion(ctx: Context, index: int, size: int | None = None) -> InclusionProof:
    checkpoint = _checkpoint(ctx, size)
    leaves = ctx.store.leaf_hashes(checkpoint.tree_size)
    return InclusionProof(log_index=index, tree_size=checkpoint.tree_size,
                          hashes=tuple(merkle.inclusion_proof(leaves, index)),
                          checkpoint=checkpoint)


# --- registrations ------------------------------------------------------------------------


def _info(record: Registration) -> pb.RegistrationInfo:
    return wire.registration_to_proto(RegistrationInfo(
        registration_id=record.registration_id, owner=record.owner,
        integrated_time=record.created_at, host_fingerprint=record.host_fingerprint,
        watermark_commitment=record.commitment, layer=record.layer, n_bits=record.n_bits,
        log_index=record.log_index, revoked_at=record.revoked_at,
    ))


def _logged(record: Registration, state: RegistrationState) -> Registration:
    """The stored record with every deciding column replaced by the signed log's value.

    A column that differs (an insider's edit, a bad restore) changes no decision: the log
    decides, and the difference is logged as an alert for the operator, whose audit fails
    on it until the database is repaired.
    """
    logged = replace(record, **{column: getattr(state, name) for column, name in DECIDING_COLUMNS.items()})
    differ = [c for c in DECIDING_COLUMNS if getattr(record, c) != getattr(logged, c)]
    if differ:
        log.error("ALERT: registration %s: the database's %s disagree with the signed log; "
                  "deciding by the log (run freemark-keyserver audit)", record.registration_id,
                  ", ".join(differ))
    return logged


def _registration(ctx: Context, registration_id: str) -> Registration | None:
    """A registration as the log says it is, with its sealed secrets from the store.

    None if the log holds no such registration (a row the log does not justify is ignored
    and reported); a logged registration whose row is gone fails closed (INTERNAL).
    """
    state = ctx.ledger.read(ctx.store, lambda registry: registry.get(registration_id))
    record = ctx.store.get_registration(registration_id)
    if state is None:
        if record is not None:
            log.error("ALERT: registration %s is in the database but not in the signed log; "
                      "ignored (run freemark-keyserver audit)", registration_id)
        return None
    if record is None:
        log.error("ALERT: registration %s is in the signed log but not in the database",
                  registration_id)
        raise ServiceError(ErrorCode.INTERNAL, "the key server's store is missing a logged "
                           "registration; the operator has been alerted")
    return _logged(record, state)


def _logged_many(ctx: Context, query: Callable[[LogRegistry], list[RegistrationState]]
                 ) -> list[Registration]:
    states = ctx.ledger.read(ctx.store, query)
    found = [_registration(ctx, s.registration_id) for s in states]
    return [r for r in found if r is not None]


def _visible(ctx: Context, principal: Principal, registration_id: str) -> Registration:
    """The record, if this principal may see it; other owners' records are NOT_FOUND."""
    if not registration_id or len(registration_id) > 64:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "give a registration id")
    record = _registration(ctx, registration_id)
    if record is None or (principal.role == OWNER and record.owner != principal.name):
        raise ServiceError(ErrorCode.NOT_FOUND, f"no registration {registration_id!r} visible to you")
    return record


def _open_sealed(ctx: Context, record: Registration) -> tuple[KeyBundle, list[Reference]]:
    """A registration's bundle and reference panel, decrypted."""
    plaintext = open_envelope(ctx.keyring, Envelope.from_bytes(record.envelope),
                              record_id=record.registration_id, owner=record.owner)
    return panels.open_bytes(plaintext)


def _runner(ctx: Context, options: dict[str, Any] | None = None) -> panels.Runner:
    return lambda model, bundle, weights, probes: _sandboxed(ctx, model, bundle, weights,
                                                             options, probes)


def _read(ctx: Context, model: Path, bundle: KeyBundle, weights: Path | None = None,
          options: dict[str, Any] | None = None, *, probes: bool = True) -> panels.Reading:
    """One sandboxed pass of an untrusted model over the triggers and (with `probes`) the
    alignment probes."""
    return panels.read(_runner(ctx, options), model, bundle, weights, probes=probes)


def add_panel_member(ctx: Context, model: Path, *, like: str, label: str, now: int
                     ) -> PanelMember:
    """The operator's `panel add`: a reference for the architecture family of registration
    `like`, read in the sandbox with its key (so it is vetted and known to run)."""
    record = _registration(ctx, like)
    if record is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no registration {like!r}")
    bundle, _ = _open_sealed(ctx, record)
    if bundle.probe_profile is None:
        raise ServiceError(ErrorCode.INVALID_BUNDLE, f"{like} has a key without a probe profile; "
                           "pick a registration made with this version")
    return panels.add_member(_runner(ctx), ctx.store, ctx.keyring, model, like=record,
                             bundle=bundle, label=label, now=now)


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


def register(ctx: Context, principal: Principal, bundle: KeyBundle, host: Path,
             references: Sequence[Path] = (), *,
             host_format: int = pb.MODEL_FORMAT_PT2) -> pb.Receipt:
    """Check, store and log a registration; return its signed receipt.

    The host's probe profile is measured here, in the sandbox, and replaces the uploaded
    one; each reference is read the same way and refused if it is the host relabelled.
    """
    require_role(principal, OWNER)
    claims = _PriorClaims(ctx, principal, bundle)
    with _sandbox_refusals():  # one child reads the host, then judges it against earlier keys
        _, results = ctx.batch(host, [panels.trigger_run(bundle, probes=True)],
                               limits=ctx.config.sandbox,
                               options=formats.sandbox_options(host_format), then=claims.runs)
    assert claims.host is not None  # `runs` ran, or the call raised
    claims.judge(results[1:])
    reading = claims.host
    bundle = panels.with_profile(bundle, reading)
    panel = panels.measure_panel(_runner(ctx), references, bundle, reading)
    if reading.probes is not None:
        panel += panels.operator_panel(_runner(ctx), ctx.store, ctx.keyring,
                                       bundle, reading, panel)

    registration_id = "reg_" + secrets.token_hex(REGISTRATION_ID_BYTES)
    envelope = seal(ctx.keyring, panels.seal_bytes(bundle, panel), record_id=registration_id,
                    owner=principal.name)
    # Streamed from the spool file into the store a segment at a time, never read whole.
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
        body, index, _ = _append(ctx, RECEIPT_KIND, lambda i, t: wire.encode_body(Receipt, {
            "registration_id": registration_id, "owner": principal.name,
            "host_fingerprint": reading.fingerprint, "watermark_commitment": wm_commitment,
            "layer": bundle.layer, "n_bits": bundle.n_bits, "log_index": i, "integrated_time": t,
            "panel": panel_record, "architecture_digest": reading.architecture_digest,
        }), record)
    except DuplicateError as exc:  # a concurrent Register of the same host committed first
        raise _claimed(principal, _logged_many(
            ctx, lambda registry: registry.by_fingerprint(reading.fingerprint)),
                       "a concurrent Register of the same weights committed first") from exc
    log.info("registered %s for %s at log index %d (panel of %d)", registration_id,
             principal.name, index, len(panel))
    receipt = wire.read_statement(Receipt, _statement(ctx, body), _inclusion(ctx, index))
    return wire.receipt_to_proto(receipt)


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


class _PriorClaims:
    """ALREADY_EXISTS when an earlier registration (`_blocks`) already claims the upload.

    Claimed means: the same weights, or an earlier key's verdict (plain and, with that
    registration's panel, aligned, so a relabelled, rescaled or padded copy is caught) is
    a match. Earlier registrations are looked up by architecture family (weight names,
    not shapes), so a widened copy is compared too; family and weights are read from the
    signed log, so editing a database column cannot switch the check off. The refusal
    names neither the earlier registration nor any figure: a number here would let a thief
    steer his laundering one query at a time.

    The upload is read with every earlier key by the sandbox child that read it with its
    own (`runs` is the pool's follow-up: one load in all), on each key's triggers and, where
    that registration's panel lets the aligned test run, its probes.

    Running the uploader's program on another owner's triggers must not let it observe
    them: any failure of that run or of its judgement (sandbox deadline, resource limit,
    crash, model error, anything) is treated exactly as a non-match, so the call goes on
    as it would have; the failure is logged for the operator and never answered. Only the
    caller's own cancellation ends the call: it does not depend on the triggers.
    """

    def __init__(self, ctx: Context, principal: Principal, bundle: KeyBundle) -> None:
        self.ctx, self.principal, self.bundle = ctx, principal, bundle
        self.host: panels.Reading | None = None
        self.earlier: list[tuple[Registration, KeyBundle, list[Reference]]] = []

    def runs(self, identity: bytes, results: list[np.ndarray | Exception]) -> list[TriggerRun]:
        """With the host's own reading (its child still holds it): check the host, refuse an
        upload of registered weights, and return the runs for every earlier key."""
        try:
            self.host = panels.reading_of(self.bundle, identity, results[0], self.bundle.probes)
        except InvalidInputError as exc:
            raise ServiceError(ErrorCode.INVALID_MODEL, _public(exc)) from exc
        _check_host(self.bundle, self.host)
        fingerprint, family = self.host.fingerprint, self.host.architecture_digest
        same = [r for r in _logged_many(self.ctx, lambda reg: reg.by_fingerprint(fingerprint))
                if _blocks(r, self.principal)]
        if same:
            raise _claimed(self.principal, same, "the same weights are registered")
        self.earlier = [(record, *_open_sealed(self.ctx, record)) for record in
                        _logged_many(self.ctx, lambda reg: reg.by_architecture(family))
                        if _blocks(record, self.principal)]
        return [panels.trigger_run(bundle, aligns(bundle, panel))
                for _, bundle, panel in self.earlier]

    def judge(self, results: Sequence[np.ndarray | Exception]) -> None:
        """Refuse the upload if an earlier key decodes it; a failure is a non-match."""
        assert self.host is not None
        for (record, bundle, panel), result in zip(self.earlier, results):
            try:
                theirs = panels.reading_of(bundle, self.host.fingerprint
                                           + self.host.architecture_digest, result,
                                           bundle.probes if aligns(bundle, panel) else 0)
                verdict = judge_activations(theirs.triggers, bundle,
                                            probe_activations=theirs.probes, panel=panel)
            except Exception as exc:  # noqa: BLE001 - every failure must look like a non-match
                log.warning("Register by %s: the upload could not be judged with earlier "
                            "registration %s (%s: %s); treated as no match", self.principal.name,
                            record.registration_id, type(exc).__name__, exc)
                continue
            if verdict.is_match:
                raise _claimed(self.principal, [record], f"an earlier key decodes the upload "
                               f"(log10 p {verdict.log10_p_value:.1f})")


def verify_target(ctx: Context, principal: Principal, header: pb.VerifyHeader) -> Registration:
    """Authorise a Verify before its upload is read."""
    require_role(principal, OWNER, ARBITER, ADMIN)
    record = _visible(ctx, principal, header.registration_id)
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
    if header.alpha and not 0.0 < header.alpha < 1.0:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "alpha must be in (0, 1)")
    policy = ctx.config.verdict_policy
    alpha = header.alpha or DEFAULT_ALPHA
    if not policy.alpha_min <= alpha <= policy.alpha_max:
        asked = f"alpha {alpha:g}" + ("" if header.alpha else " (the default)")
        raise ServiceError(ErrorCode.ALPHA_OUTSIDE_POLICY,
                           f"{asked} is outside this key server's verdict policy: it signs "
                           f"verdicts for {policy.describe()}")
    return record


def verify(ctx: Context, principal: Principal, record: Registration, header: pb.VerifyHeader,
           suspect: Path) -> pb.SignedVerdict:
    """Judge the uploaded suspect against a registration; return the signed, logged verdict.

    The verdict binds the suspect (SHA-256 and size, both checked against the bytes
    received), the requester and the policy. A requester other than the registration's
    owner gets a coarse verdict when the policy says so; the owner always gets the full one.
    """
    bundle, panel = _open_sealed(ctx, record)
    probes = aligns(bundle, panel)  # without an aligned test the probes would go unused
    if header.upload.format == pb.MODEL_FORMAT_SAFETENSORS:
        with host_file(ctx.store, ctx.keyring, record) as host:
            reading = _read(ctx, host, bundle, weights=suspect, probes=probes,
                            options={**formats.stored_host_options(host), **SKIP_FINGERPRINT})
    else:
        reading = _read(ctx, suspect, bundle, probes=probes, options={**formats.sandbox_options(
            header.upload.format, header.onnx_tensor), **SKIP_FINGERPRINT})
    try:
        verdict = judge_activations(reading.triggers, bundle, alpha=header.alpha or DEFAULT_ALPHA,
                                    probe_activations=reading.probes, panel=panel)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, str(exc)) from exc
    policy = ctx.config.verdict_policy
    coarse = policy.arbiter_disclosure == "coarse" and principal.name != record.owner
    verdict_type: type[SignedVerdict | CoarseVerdict] = (CoarseVerdict if coarse
                                                              else SignedVerdict)
    judgement = coarse_values(verdict) if coarse else wire.signed_values(verdict)
    binding = {"registration_id": record.registration_id, "requested_by": principal.name,
               "suspect_sha256": header.upload.sha256, "suspect_size": header.upload.total_size,
               "policy": policy}
    body, index, _ = _append(ctx, verdict_type.KIND, lambda i, t: wire.encode_body(verdict_type, {
        **judgement, **binding, "log_index": i, "integrated_time": t}))
    log.info("verdict on %s by %s: %s (log10 p %.1f, %s) at log index %d", record.registration_id,
             principal.name, verdict.outcome, verdict.log10_p_value,
             "coarse" if coarse else "full", index)
    signed = wire.read_statement(verdict_type, _statement(ctx, body), _inclusion(ctx, index))
    return wire.verdict_to_proto(signed)


def get_registration(ctx: Context, principal: Principal, request: pb.GetRegistrationRequest
                     ) -> pb.RegistrationInfo:
    return _info(_visible(ctx, principal, request.registration_id))


def list_registrations(ctx: Context, principal: Principal, request: pb.ListRegistrationsRequest
                       ) -> pb.ListRegistrationsResponse:
    size = request.page_size or DEFAULT_PAGE
    if size > MAX_PAGE:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"page_size is at most {MAX_PAGE}")
    owner = principal.name if principal.role == OWNER else None
    try:
        records, token = ctx.store.list_registrations(owner, size, request.page_token)
    except ValueError as exc:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "invalid page_token; start from the "
                           "first page") from exc
    logged = [_registration(ctx, r.registration_id) for r in records]
    shown = [r for r in logged if r is not None and (owner is None or r.owner == owner)]
    return pb.ListRegistrationsResponse(registrations=[_info(r) for r in shown],
                                        next_page_token=token)


def revoke(ctx: Context, principal: Principal, request: pb.RevokeRequest) -> pb.RegistrationInfo:
    """Owners revoke their own registrations, admins any: a signed revocation is logged and
    returned in the reply's `revocation`. Revoking a revoked registration logs nothing."""
    require_role(principal, OWNER, ADMIN)
    reason = request.reason
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"the reason must be printable text of "
                           f"at most {MAX_REASON_CHARS} characters")
    record = _visible(ctx, principal, request.registration_id)
    if record.revoked_at is not None:
        return _info(record)
    body, index, at = _append(ctx, REVOCATION_KIND, lambda i, t: wire.encode_body(Revocation, {
        "registration_id": record.registration_id, "registration_log_index": record.log_index,
        "revoked_by": principal.name, "reason": reason, "log_index": i, "integrated_time": t}))
    ctx.store.revoke(record.registration_id, at)  # a copy for lookups; the log decides
    log.info("revoked %s by %s at log index %d", record.registration_id, principal.name, index)
    revocation = wire.read_statement(Revocation, _statement(ctx, body), _inclusion(ctx, index))
    info = _info(replace(record, revoked_at=at))
    info.revocation.CopyFrom(wire.revocation_to_proto(revocation))
    return info


def get_checkpoint(ctx: Context) -> pb.SignedCheckpoint:
    return publish_checkpoint(ctx)


def _size(ctx: Context, requested: int) -> int:
    current = ctx.store.tree_size()
    size = requested or current
    if size > current:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"the log has only {current} entries")
    return size


def get_inclusion_proof(ctx: Context, request: pb.GetInclusionProofRequest) -> pb.InclusionProof:
    size = _size(ctx, request.tree_size)
    if request.log_index >= size:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no log entry {request.log_index} in a tree of {size}")
    return wire.inclusion_to_proto(_inclusion(ctx, request.log_index, size))


def get_consistency_proof(ctx: Context, request: pb.GetConsistencyProofRequest
                          ) -> pb.ConsistencyProof:
    size = _size(ctx, request.new_size)
    if not 1 <= request.old_size <= size:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"old_size must be in [1, {size}]")
    proof = ConsistencyProof(
        old_size=request.old_size, new_size=size, checkpoint=_checkpoint(ctx, size),
        hashes=tuple(merkle.consistency_proof(ctx.store.leaf_hashes(size), request.old_size)))
    return wire.consistency_to_proto(proof)


def get_entries(ctx: Context, request: pb.GetEntriesRequest) -> pb.GetEntriesResponse:
    """Entries [start, end), at most `MAX_ENTRIES_PAGE` and none past the tree size."""
    size = ctx.store.tree_size()
    if request.start >= size:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"start {request.start} is not below the tree size {size}")
    if request.end and request.end <= request.start:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "end must be above start (or 0)")
    end = min(request.end or size, request.start + MAX_ENTRIES_PAGE, size)
    return pb.GetEntriesResponse(entries=[e.entry for e in ctx.store.entries(request.start, end)])


def public_key(ctx: Context) -> pb.PublicKey:
    return pb.PublicKey(pem=ctx.signer.public_key_pem(), key_id=ctx.signer.key_id,
                        origin=ctx.config.origin,
                        note_verifier_key=verifier_key(ctx.config.origin, ctx.signer.verifier()))
