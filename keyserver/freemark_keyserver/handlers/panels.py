"""Reading models for the aligned test at the TTP: sandboxed passes over triggers and probes,
reference panels (the owner's and the operator's) measured and checked, the operator's
`panel add` (`add_panel_member`), and the sealed form that keeps them with the key
(`seal_bytes`, `open_bytes`, `open_sealed`; `open_output_key` for an output key sealed
beside the bundle).

One sandbox run reads a model's key layer on the triggers followed by the bundle's
alignment probes (`freemark.scheme.probes.with_probes`, built in the sandbox child from the
triggers), so the aligned test costs no extra model load. Reference models are untrusted uploads like any other: vetted and run in the
sandbox, and only their activations are kept, sealed beside the bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from freemark.blackbox.key import OutputKey
from freemark.errors import AlignmentLimitError, InvalidInputError
from freemark.formats.table import ModelFormat, by_name, by_wire
from freemark.panel import Reference, reference_from_proto, reference_to_proto
from freemark.reading import probe_count, split_activations
from freemark.records.types import PanelMemberEntry
from freemark.scheme.bundle import KeyBundle, from_bytes, from_proto, to_proto
from freemark.v1 import bundle_pb2
from freemark.v1 import keyservice_pb2 as pb
from freemark.verdict.aligned import THRESHOLD
from freemark.verdict.canon import align
from freemark_keyserver.crypto import Envelope, MasterKeyring, open_envelope
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers import outputs
from freemark_keyserver.handlers.context import Context, Runner, public, sandbox_runner
from freemark_keyserver.handlers.hosts import member_file, store_member
from freemark_keyserver.handlers.lookups import lookup
from freemark_keyserver.handlers.outputs import is_output_registration
from freemark_keyserver.sandbox.runner import ModelIdentity, TriggerRun
from freemark_keyserver.store import PanelMember, Registration, Store

log = logging.getLogger("freemark_keyserver")

# A reference whose every live unit matches a host unit this closely is the host relabelled.
COPY_CORRELATION = 0.999
PROGRAM, CHECKPOINT = by_name("pt2"), by_name("hf")  # what reference models may be


@dataclasses.dataclass(frozen=True)
class Reading:
    """One sandboxed pass: activations on the triggers and on the probes, and the identity."""

    triggers: np.ndarray
    probes: np.ndarray | None
    identity: ModelIdentity

    @property
    def fingerprint(self) -> bytes:
        return self.identity.fingerprint

    @property
    def architecture_digest(self) -> bytes:
        return self.identity.architecture_digest


def read(run: Runner, model: Path, bundle: KeyBundle, weights: Path | None = None, *,
         probes: bool = True) -> Reading:
    """Run `model` once on the bundle's triggers and, with `probes`, its alignment probes
    (`run` maps sandbox failures); without them the reading's `probes` is None."""
    count = probe_count(bundle, probes=probes)
    result = run(model, bundle, weights, count)
    try:
        return reading_of(bundle, result.identity,
                          result.activations, count)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, str(exc)) from exc


def trigger_run(bundle: KeyBundle, probes: bool) -> TriggerRun:
    """The sandbox run that reads a model with this key: its triggers, then (with `probes`)
    the key's alignment probes, which the sandbox child builds from them."""
    return TriggerRun(bundle.layer, bundle.pooling, bundle.triggers,
                      probe_count(bundle, probes=probes))


def reading_of(bundle: KeyBundle, identity: ModelIdentity, activations: np.ndarray | Exception,
               probes: int) -> Reading:
    """A sandbox run's answer for `bundle` (its `trigger_run`) as a Reading; raises the run's
    own failure, or InvalidInputError when the rows do not fit."""
    if isinstance(activations, Exception):
        raise activations
    triggers, probed = split_activations(activations, bundle, probes)
    return Reading(triggers=triggers, probes=probed, identity=identity)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A panel member read for one registration, and where it came from: the receipt names
    every member's source, and a refusal or log line names the member."""

    reference: Reference
    what: str  # how messages name it: "reference #2", "panel member <label>"
    member_id: str = ""  # the operator's panel member id; "" for the owner's references

    @property
    def source(self) -> str:
        """"operator" or "owner" (`freemark.records.types.PANEL_SOURCES`)."""
        return "operator" if self.member_id else "owner"


def reference_format(header: pb.UploadHeader, host: ModelFormat) -> ModelFormat:
    """A reference's format, before its bytes are read: a program, or a checkpoint beside a
    checkpoint host (a panel is read with the host's key, so it must run the host's kind of
    triggers; an output key's host is a program); any other is refused."""
    allowed = (PROGRAM, CHECKPOINT) if host is CHECKPOINT else (PROGRAM,)
    row = by_wire(header.format)
    if row is None or row not in allowed:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "reference models must be "
                           + " or ".join(r.what for r in allowed))
    return row


def _measure(run: Runner, path: Path, bundle: KeyBundle, host: Reading, seen: set[bytes],
             what: str) -> Reference:
    """Read one reference in the sandbox; refuse one that is the host itself, relabelled or not."""
    reading = read(run, path, bundle)
    if reading.probes is None or bundle.probe_profile is None:
        raise ServiceError(ErrorCode.INVALID_BUNDLE, "reference models need a key with a probe "
                           "profile: re-derive it with this version of freemark")
    if reading.fingerprint in seen:
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{what} has the same weights as the host or "
                           "another reference: a panel needs distinct, independent models")
    try:  # against the profile as sealed, so the count is the one a verdict would measure
        matching = align(bundle.probe_profile, reading.probes)
    except InvalidInputError as exc:
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{what}: {exc}") from exc
    except AlignmentLimitError as exc:
        raise ServiceError(ErrorCode.SANDBOX_LIMIT, f"{what}: {exc}") from exc
    if matching.count_above(COPY_CORRELATION) == matching.host.units:
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{what} computes the host's own units "
                           "(relabelled or rescaled): it is a copy, not an independent model")
    seen.add(reading.fingerprint)
    return Reference(fingerprint=reading.fingerprint, trigger_activations=reading.triggers,
                     probe_activations=reading.probes,
                     matched_units=matching.count_above(THRESHOLD))


def measure_panel(run: Runner, paths: Sequence[Path], bundle: KeyBundle, host: Reading
                  ) -> list[Candidate]:
    """Read the owner's references; any that fails or is a copy of the host refuses the call."""
    seen = {host.fingerprint}
    panel = []
    for number, path in enumerate(paths, start=1):
        what = f"reference #{number}"
        panel.append(Candidate(_measure(run, path, bundle, host, seen, what), what))
    return panel


def operator_panel(run: Runner, store: Store, keyring: MasterKeyring,
                   bundle: KeyBundle, host: Reading, owners: Sequence[Candidate]
                   ) -> tuple[list[Candidate], list[PanelMemberEntry]]:
    """The operator's active members for the host's architecture family, read for this key,
    and the receipt's entries for those left out here.

    A member that cannot be read for this key or is the host itself is left out (logged,
    and named in the receipt with the refusal); one the owner also gave is his reference
    already. One that leans toward the host is left out later, by
    `freemark_keyserver.handlers.vetting`. The operator's panel never makes Register fail
    through a member it cannot use.
    """
    seen = {host.fingerprint, *(c.reference.fingerprint for c in owners)}
    panel, skipped = [], []
    for member in store.panel_members(host.architecture_digest):
        if member.fingerprint in seen:
            continue
        what = f"panel member {member.label}"
        try:
            with member_file(store, keyring, member) as path:
                panel.append(Candidate(_measure(run, path, bundle, host, seen, what), what,
                                       member.member_id))
        except ServiceError as exc:
            log.warning("panel member %s left out of a registration: %s", member.member_id, exc)
            skipped.append(PanelMemberEntry(fingerprint=member.fingerprint, source="operator",
                                            member_id=member.member_id, left_out=public(exc)))
    return panel, skipped


def add_member(run: Runner, store: Store, keyring: MasterKeyring, model: Path, *,
               like: Registration, bundle: KeyBundle, label: str, now: int) -> PanelMember:
    """Vet and read `model` in the sandbox with `like`'s key, then seal and store it as a member
    of `like`'s architecture family (the operator's `panel add`)."""
    reading = read(run, model, bundle)
    if reading.architecture_digest != like.architecture_digest:
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{model} is not of the architecture family of "
                           f"{like.registration_id} (its weight names differ)")
    if store.find_by_fingerprint(reading.fingerprint):
        raise ServiceError(ErrorCode.INVALID_MODEL, f"{model} is a registered host; panel members "
                           "must be independent models")
    member_id = "pan_" + secrets.token_hex(12)
    envelope = store_member(store, keyring, model, member_id=member_id)
    member = PanelMember(member_id=member_id, family=reading.architecture_digest,
                         fingerprint=reading.fingerprint, label=label or model.name, added_at=now,
                         key_version=keyring.current_version, envelope=envelope)
    store.add_panel_member(member)
    return member


def add_panel_member(ctx: Context, model: Path, *, like: str, label: str, now: int
                     ) -> PanelMember:
    """The operator's `panel add`: a reference for the architecture family of registration
    `like`, read in the sandbox with its key (so it is vetted and known to run)."""
    record = lookup(ctx, like)
    if record is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no registration {like!r}")
    bundle, _ = open_sealed(ctx, record)
    if bundle.probe_profile is None:
        raise ServiceError(ErrorCode.INVALID_BUNDLE, f"{like} has a key without a probe profile; "
                           "pick a registration made with this version")
    return add_member(sandbox_runner(ctx), ctx.store, ctx.keyring, model, like=record,
                      bundle=bundle, label=label, now=now)


def with_profile(bundle: KeyBundle, host: Reading) -> KeyBundle:
    """The bundle with the host's probe profile as the TTP measured it, not as uploaded."""
    if host.probes is None:
        return bundle
    return dataclasses.replace(bundle, probe_profile=host.probes.astype(np.float32))


SEALED_MAGIC = b"freemark/v1/sealed-registration\n"


def seal_bytes(bundle: KeyBundle, panel: Sequence[Reference], output_key: bytes = b"") -> bytes:
    """The plaintext the TTP seals for a registration: a magic line, then `SealedRegistration`
    (with `output_key`, `outputs.seal_bytes` of an output key registered beside the bundle)."""
    message = bundle_pb2.SealedRegistration(bundle=to_proto(bundle),
                                            panel=[reference_to_proto(r) for r in panel],
                                            output_key=output_key)
    return SEALED_MAGIC + message.SerializeToString(deterministic=True)


def _sealed_message(plaintext: bytes) -> bundle_pb2.SealedRegistration:
    message = bundle_pb2.SealedRegistration()
    try:
        message.ParseFromString(plaintext[len(SEALED_MAGIC):])
    except DecodeError as exc:
        raise InvalidInputError(f"not a sealed registration ({exc})") from exc
    return message


def open_bytes(plaintext: bytes) -> tuple[KeyBundle, list[Reference]]:
    """The inverse of `seal_bytes`; records sealed before panels existed hold a bare bundle."""
    if not plaintext.startswith(SEALED_MAGIC):
        return from_bytes(plaintext), []
    message = _sealed_message(plaintext)
    return from_proto(message.bundle), [reference_from_proto(r) for r in message.panel]


def open_sealed(ctx: Context, record: Registration) -> tuple[KeyBundle, list[Reference]]:
    """A registration's bundle and reference panel, decrypted; refused for a registration
    that holds an output key alone (it has no bundle: `outputs.open_sealed`)."""
    if is_output_registration(record):
        raise ServiceError(ErrorCode.MALFORMED_REQUEST,
                           f"registration {record.registration_id} holds an output key alone, "
                           "judged through a model's answers, not its activations")
    return open_bytes(_plaintext(ctx, record))


def open_output_key(ctx: Context, record: Registration
                    ) -> tuple[OutputKey, outputs.MeasuredPanel] | None:
    """A registration's output key and the panel answers the TTP measured: an output-key
    registration's, or the one sealed beside a white-box key; None where it holds none."""
    if is_output_registration(record):
        return outputs.open_sealed(ctx, record)
    plaintext = _plaintext(ctx, record)
    if not plaintext.startswith(SEALED_MAGIC):
        return None
    message = _sealed_message(plaintext)
    return outputs.open_bytes(message.output_key) if message.output_key else None


def _plaintext(ctx: Context, record: Registration) -> bytes:
    return open_envelope(ctx.keyring, Envelope.from_bytes(record.envelope),
                         record_id=record.registration_id, owner=record.owner)
