"""GetRegistration, ListRegistrations and Revoke, over registrations as the signed log has
them (`handlers.lookups`)."""

from __future__ import annotations

import logging
from dataclasses import replace

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
from freemark_keyserver.handlers.lookups import lookup, visible
from freemark_keyserver.store import Principal, Registration

__all__ = ["get_registration", "list_registrations", "registration_info", "revoke"]

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
