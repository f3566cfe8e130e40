"""Registrations as the log says they are: who may see which (`visible`), GetRegistration,
ListRegistrations and Revoke.

Every lookup reads the registration from the signed log (`tlog.ledger`) and its sealed
secrets from the store; where the two disagree the log decides and the operator is alerted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from freemark.audit.registry import LogRegistry, RegistrationState
from freemark.records import wire
from freemark.records.types import REVOCATION_KIND, RegistrationInfo, Revocation
from freemark.v1 import keyservice_pb2 as pb
from freemark_keyserver.auth import ADMIN, OWNER, require_role
from freemark_keyserver.errors import ErrorCode, ServiceError
from freemark_keyserver.handlers.context import (
    Context,
    append_entry,
    inclusion_proof,
    sign_statement,
)
from freemark_keyserver.store import Principal, Registration
from freemark_keyserver.tlog.ledger import DECIDING_COLUMNS

__all__ = ["get_registration", "list_registrations", "lookup", "lookup_many",
           "registration_info", "revoke", "visible"]

log = logging.getLogger("freemark_keyserver")
MAX_PAGE = 100
MAX_REASON_CHARS = 1024  # a revocation's reason, signed into the log
DEFAULT_PAGE = 20


def registration_info(record: Registration) -> pb.RegistrationInfo:
    """A registration as a reply shows it."""
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


def lookup(ctx: Context, registration_id: str) -> Registration | None:
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


def lookup_many(ctx: Context, query: Callable[[LogRegistry], list[RegistrationState]]
                ) -> list[Registration]:
    """The registrations a query of the log's registry finds, each as `lookup` reads it."""
    states = ctx.ledger.read(ctx.store, query)
    found = [lookup(ctx, s.registration_id) for s in states]
    return [r for r in found if r is not None]


def visible(ctx: Context, principal: Principal, registration_id: str) -> Registration:
    """The record, if this principal may see it; other owners' records are NOT_FOUND."""
    if not registration_id or len(registration_id) > 64:
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, "give a registration id")
    record = lookup(ctx, registration_id)
    if record is None or (principal.role == OWNER and record.owner != principal.name):
        raise ServiceError(ErrorCode.NOT_FOUND, f"no registration {registration_id!r} visible to you")
    return record


def get_registration(ctx: Context, principal: Principal, request: pb.GetRegistrationRequest
                     ) -> pb.RegistrationInfo:
    return registration_info(visible(ctx, principal, request.registration_id))


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
    logged = [lookup(ctx, r.registration_id) for r in records]
    shown = [r for r in logged if r is not None and (owner is None or r.owner == owner)]
    return pb.ListRegistrationsResponse(registrations=[registration_info(r) for r in shown],
                                        next_page_token=token)


def revoke(ctx: Context, principal: Principal, request: pb.RevokeRequest) -> pb.RegistrationInfo:
    """Owners revoke their own registrations, admins any: a signed revocation is logged and
    returned in the reply's `revocation`. Revoking a revoked registration logs nothing."""
    require_role(principal, OWNER, ADMIN)
    reason = request.reason
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise ServiceError(ErrorCode.MALFORMED_REQUEST, f"the reason must be printable text of "
                           f"at most {MAX_REASON_CHARS} characters")
    record = visible(ctx, principal, request.registration_id)
    if record.revoked_at is not None:
        return registration_info(record)
    body, index, at = append_entry(ctx, REVOCATION_KIND, lambda i, t: wire.encode_body(Revocation, {
        "registration_id": record.registration_id, "registration_log_index": record.log_index,
        "revoked_by": principal.name, "reason": reason, "log_index": i, "integrated_time": t}))
    ctx.store.revoke(record.registration_id, at)  # a copy for lookups; the log decides
    log.info("revoked %s by %s at log index %d", record.registration_id, principal.name, index)
    revocation = wire.read_statement(Revocation, sign_statement(ctx, body),
                                     inclusion_proof(ctx, index))
    info = registration_info(replace(record, revoked_at=at))
    info.revocation.CopyFrom(wire.revocation_to_proto(revocation))
    return info
